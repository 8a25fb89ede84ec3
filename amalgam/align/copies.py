"""Aligned copies: a checkpoint rewritten tensor by tensor (rows remapped, units permuted) into
a committed folder the merge reads instead of the input."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from amalgam import storage
from amalgam.checkpoint import Checkpoint, tensor_nbytes
from amalgam.engine.plan import shard_groups
from amalgam.writer import INDEX_NAME, CheckpointWriter, intact

#: (name, tensor as stored) -> the aligned tensor (same dtype; its shape as ``shapes`` says).
Transform = Callable[[str, torch.Tensor], torch.Tensor]
SHARD_BYTES = 2 * 10**9


def aligned_copy_done(uri: str, **storage_options: Any) -> bool:
    """Whether ``uri`` holds a complete aligned copy (a re-run reuses it)."""
    fs, path = storage.resolve(uri, **storage_options)
    return intact(fs, path)


def write_aligned_copy(
    src: Checkpoint,
    output_uri: str,
    transform: Transform,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    side_json: Mapping[str, Any] | None = None,
    skip_side: tuple[str, ...] = (),
    max_shard_bytes: int = SHARD_BYTES,
    also_read: Iterable[Checkpoint] = (),
    **storage_options: Any,
) -> str:
    """Write ``transform`` of every tensor of ``src`` to ``output_uri`` (replacing an earlier
    copy), with ``src``'s side files (less ``skip_side``) and ``side_json`` files; one tensor in
    memory at a time. ``shapes``: output shapes of the tensors whose shape changes;
    ``also_read``: other checkpoints ``transform`` reads rows from. Not committed if a file of
    ``src`` or of those changed since it was opened."""
    shapes = dict(shapes or {})
    entries = [
        (name, src.info(name).dtype, tuple(shapes.get(name, src.shape(name))))
        for name in src.names()
    ]
    shards = shard_groups(entries, lambda e: tensor_nbytes(e[1], e[2]), max_shard_bytes)
    metadata = {"format": "pt", "amalgam": "aligned"}
    sources = [src, *also_read]
    writer = CheckpointWriter(output_uri, overwrite=True, sources=sources, **storage_options)
    try:
        for file, unit in shards:
            shard = writer.shard(file, unit, metadata)
            try:
                for name, _, _ in unit:
                    shard.write(name, transform(name, src.tensor(name)).contiguous())
            except BaseException:
                shard.discard()
                raise
            shard.close()
        if len(shards) > 1:
            weight_map = {name: file for file, unit in shards for name, _, _ in unit}
            total = sum(tensor_nbytes(d, s) for _, d, s in entries)
            writer.write_json(
                INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map}
            )
        side_json = dict(side_json or {})
        for name in src.side_files():
            if name not in side_json and name not in skip_side:
                writer.copy_in(src.fs, storage.join(src.root, name), name)
        for name, obj in side_json.items():
            writer.write_json(name, obj)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return output_uri
