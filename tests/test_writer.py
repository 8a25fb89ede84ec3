"""The checkpoint writer's commit: atomic placement and refusal to clobber a concurrent run."""

from __future__ import annotations

import pytest

from amalgam.errors import OutputError
from amalgam.writer import CheckpointWriter


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
