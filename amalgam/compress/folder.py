"""A compressed folder's common parts: its manifest's name and format, the size report, and
writing a rebuilt dense model (shared by ComPEFT and TALL storage)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from amalgam import storage
from amalgam.checkpoint import Checkpoint
from amalgam.engine.plan import WorkUnit
from amalgam.writer import CheckpointWriter

MANIFEST = "compression.json"
FORMAT = 1
METHODS = ("compeft", "tall", "mc_smoe")  # what a compression.json may hold


@dataclass(frozen=True)
class TensorReport:
    """One tensor's outcome: how it is stored, entries kept, and bytes before and after. For
    TALL (encoding ``tall``): ``numel`` counts one mask bit per entry and task, ``kept`` the
    bits set, ``dense_bytes`` the tensor in every expert."""

    name: str
    encoding: str  # bitmask | elias_fano | indices | dense | tall | losparse
    numel: int
    kept: int
    dense_bytes: int
    stored_bytes: int


@dataclass
class CompressResult:
    """Where the compressed model went and its exact size: ``compressed_bytes`` is the byte
    count of the files that hold the weights (shards, headers included, and the manifest);
    config and tokenizer files copied alongside are counted apart in ``side_bytes``."""

    output: str
    compressed_bytes: int
    dense_bytes: int
    side_bytes: int
    files: dict[str, int]
    tensors: list[TensorReport] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.compressed_bytes

    def summary(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "compressed_bytes": self.compressed_bytes,
            "dense_bytes": self.dense_bytes,
            "ratio": self.ratio,
            "side_bytes": self.side_bytes,
            "kept": sum(t.kept for t in self.tensors),
            "parameters": sum(t.numel for t in self.tensors),
        }


def copy_side_files(src: Checkpoint, writer: CheckpointWriter) -> int:
    """Copy ``src``'s config and tokenizer files into the writer's folder; their bytes."""
    size = 0
    for name in src.side_files():
        path = storage.join(src.root, name)
        writer.copy_in(src.fs, path, name)
        size += src.fs.size(path)
    return size


def write_rebuilt(
    output_uri: str,
    units: tuple[WorkUnit, ...],
    tensor: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
    side: Checkpoint,
    *,
    sources: Iterable[Checkpoint],
    overwrite: bool,
    **storage_options: Any,
) -> str:
    """Write a rebuilt model folder: the shards of ``units``, each tensor from ``tensor(name)``
    as it is written, an index when sharded, and ``side``'s config and tokenizer files;
    committed only if ``sources`` (what ``tensor`` reads) are unchanged since opened."""
    writer = CheckpointWriter(output_uri, overwrite=overwrite, sources=sources, **storage_options)
    try:
        writer.write_units(units, tensor, metadata)
        copy_side_files(side, writer)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return storage.full_uri(writer.fs, writer.path)
