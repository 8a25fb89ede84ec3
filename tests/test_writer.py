"""The checkpoint writer's commit: atomic placement and refusal to clobber a concurrent run."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from amalgam import storage
from amalgam.errors import OutputError
from amalgam.writer import COMMIT_RECORD, CheckpointWriter, intact


def test_commit_refuses_output_written_meanwhile(tmp_path) -> None:
    out = tmp_path / "merged"
    writer = CheckpointWriter(str(out))
    writer.write_json("config.json", {"run": "late"})
    # another run commits the same output after this writer opened
    other = CheckpointWriter(str(out))
    other.write_json("config.json", {"run": "first"})
    other.commit()
    with pytest.raises(OutputError, match="appeared while writing"):
        writer.commit()
    writer.abort()
    assert (out / "config.json").read_text().count("first") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_commit_with_overwrite_replaces(tmp_path) -> None:
    out = tmp_path / "merged"
    CheckpointWriter(str(out)).commit()
    writer = CheckpointWriter(str(out), overwrite=True)
    writer.write_json("config.json", {"run": "second"})
    writer.commit()
    assert "second" in (out / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert sorted(p.name for p in out.iterdir()) == [COMMIT_RECORD, "config.json"]


def test_commit_record_lists_every_file_with_its_size_and_sha256(tmp_path) -> None:
    out = tmp_path / "merged"
    writer = CheckpointWriter(str(out))
    shard = writer.shard("model.safetensors", [("w", "F32", (2, 3))], {"k": "v"})
    shard.write("w", torch.arange(6, dtype=torch.float32).reshape(2, 3))
    shard.close()
    writer.write_json("config.json", {"a": 1})
    writer.commit()
    record = json.loads((out / COMMIT_RECORD).read_text())
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != COMMIT_RECORD}
    assert record["files"] == {
        name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in files.items()
    }
    assert load_file(str(out / "model.safetensors"))["w"].sum() == 15


def test_overwrite_never_nests_the_new_output_in_the_old(tmp_path) -> None:
    """An output that appears while an overwriting run writes (another run committed it) is
    replaced whole: the new folder is not moved inside it."""
    out = tmp_path / "merged"
    writer = CheckpointWriter(str(out), overwrite=True)
    writer.write_json("config.json", {"run": "second"})
    other = CheckpointWriter(str(out))
    other.write_json("config.json", {"run": "first"})
    other.commit()
    writer.commit()
    assert sorted(p.name for p in out.iterdir()) == [COMMIT_RECORD, "config.json"]
    assert "second" in (out / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_stale_staging_of_a_dead_process_is_removed_by_the_next_writer(tmp_path) -> None:
    host = socket.gethostname()
    gone = subprocess.Popen(["true"])  # a process that has exited
    gone.wait()
    stale = tmp_path / f".merged.partial-{host}-{gone.pid}-0123456789ab"
    live = tmp_path / f".merged.partial-{host}-{os.getpid()}-0123456789ab"
    other_host = tmp_path / f".merged.partial-elsewhere-{gone.pid}-0123456789ab"
    for folder in (stale, live, other_host):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    writer = CheckpointWriter(str(tmp_path / "merged"))
    writer.commit()
    assert not stale.exists()
    assert live.exists() and other_host.exists()


def test_overwrite_accepts_outputs_from_before_commit_records(tmp_path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    save_file({"w": torch.zeros(2)}, str(out / "model.safetensors"), {"amalgam_version": "0.1"})
    writer = CheckpointWriter(str(out), overwrite=True)
    writer.write_json("config.json", {})
    writer.commit()
    assert sorted(p.name for p in out.iterdir()) == [COMMIT_RECORD, "config.json"]


def test_intact_tells_a_committed_output_from_a_changed_one(tmp_path) -> None:
    out = tmp_path / "merged"
    writer = CheckpointWriter(str(out))
    shard = writer.shard("model.safetensors", [("w", "F32", (4,))], {})
    shard.write("w", torch.ones(4))
    shard.close()
    writer.write_json("config.json", {})
    writer.commit()
    fs, path = storage.resolve(str(out))
    assert intact(fs, path)
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-4:] = bytes(4)  # one entry zeroed in place: same size
    (out / "model.safetensors").write_bytes(bytes(data))
    assert not intact(fs, path)
    (out / "model.safetensors").write_bytes(bytes(data[:-4]) + torch.ones(1).numpy().tobytes())
    assert intact(fs, path)  # restored
    save_file({"x": torch.zeros(1)}, str(out / "model-extra.safetensors"))
    assert not intact(fs, path)  # a weight file the record does not list
    (out / "model-extra.safetensors").unlink()
    (out / "config.json").unlink()
    assert not intact(fs, path)
    (out / COMMIT_RECORD).unlink()
    assert not intact(fs, path)
