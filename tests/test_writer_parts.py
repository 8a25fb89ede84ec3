"""Shards put together from parts, and the commit's check that every planned shard is there."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file

from amalgam.errors import OutputError
from amalgam.writer import CheckpointWriter, ShardWriter, Written

TENSORS = {f"t{i}": torch.arange(6 * (i + 1), dtype=torch.float32) * (i + 1) for i in range(5)}
ENTRIES = [(name, "F32", tuple(t.shape)) for name, t in TENSORS.items()]
SPANS = [(0, 2), (2, 3), (3, 5)]


def write_parts(writer: CheckpointWriter, spans: list[tuple[int, int]]) -> list[Written]:
    """Each span's tensors into its part file, as Ray workers do."""
    parts = []
    for k, span in enumerate(spans):
        path = writer.part_path("model.safetensors", k)
        part = ShardWriter(writer.fs, path, ENTRIES, {"format": "pt"}, span)
        for name, _, _ in ENTRIES[span[0] : span[1]]:
            part.write(name, TENSORS[name])
        part.close()
        assert part.digest is not None
        parts.append(Written(path, part.nbytes, part.digest))
    return parts


def test_parts_arriving_in_any_order_make_the_shard_written_whole(tmp_path) -> None:
    whole = CheckpointWriter(str(tmp_path / "whole"))
    shard = whole.shard("model.safetensors", ENTRIES, {"format": "pt"})
    for name, t in TENSORS.items():
        shard.write(name, t)
    shard.close()
    whole.commit()

    assembled = CheckpointWriter(str(tmp_path / "parts"))
    parts = write_parts(assembled, SPANS)
    shard = assembled.assembler("model.safetensors", len(parts))
    for k in (2, 0, 1):  # the order their tasks ended in
        shard.add(k, parts[k])
    assert (
        shard.digest
        == hashlib.sha256((tmp_path / "whole/model.safetensors").read_bytes()).hexdigest()
    )
    size = (tmp_path / "whole/model.safetensors").stat().st_size
    assembled.expect({"model.safetensors": size})
    assembled.commit()
    got = (tmp_path / "parts/model.safetensors").read_bytes()
    assert got == (tmp_path / "whole/model.safetensors").read_bytes()
    assert all(
        torch.equal(load_file(tmp_path / "parts/model.safetensors")[n], t)
        for n, t in TENSORS.items()
    )
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole").iterdir()
    )  # no part left over


def test_a_part_other_than_its_writer_reported_is_refused(tmp_path) -> None:
    writer = CheckpointWriter(str(tmp_path / "out"))
    parts = write_parts(writer, SPANS)
    with open(parts[1].path, "r+b") as fh:  # a byte changed after its worker hashed it
        fh.write(b"\xff")
    shard = writer.assembler("model.safetensors", len(parts))
    shard.add(0, parts[0])
    with pytest.raises(OutputError, match=r"part-00001: a part of .* its writer reported"):
        shard.add(1, parts[1])
    writer.abort()
    assert not (tmp_path / "out").exists()


def test_commit_refuses_a_missing_or_short_planned_shard(tmp_path) -> None:
    writer = CheckpointWriter(str(tmp_path / "out"))
    parts = write_parts(writer, SPANS[:1])
    writer.written("model-00001-of-00002.safetensors", parts[0].nbytes, parts[0].digest)
    os.rename(parts[0].path, writer.staging + "/model-00001-of-00002.safetensors")
    writer.expect({"model-00001-of-00002.safetensors": parts[0].nbytes + 8})
    writer.expect({"model-00002-of-00002.safetensors": 100})
    with pytest.raises(OutputError) as err:
        writer.commit()
    message = str(err.value)
    assert "not committed" in message
    assert (
        f"model-00001-of-00002.safetensors: planned {parts[0].nbytes + 8} bytes, holds" in message
    )
    assert "model-00002-of-00002.safetensors: planned 100 bytes, missing" in message
    writer.abort()
    assert not (tmp_path / "out").exists()


def test_commit_refuses_a_part_never_put_into_its_shard(tmp_path) -> None:
    writer = CheckpointWriter(str(tmp_path / "out"))
    write_parts(writer, SPANS[:1])
    with pytest.raises(OutputError, match="part-00000: a part never put into its shard"):
        writer.commit()
    writer.abort()
    assert not (tmp_path / "out").exists()
