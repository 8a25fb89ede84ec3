"""The fetch stage: hashes and sizes, trailing-byte refusal, local staging, discovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amalgam.checkpoint import open_checkpoint
from amalgam.discover import discover_checkpoints
from amalgam.errors import CheckpointError
from amalgam.fetch import fetch_model, fetch_recipe, stage_model
from amalgam.recipe import parse_recipe
from tests.helpers import family, recipe_dict


def test_fetch_records_hash_size_and_files(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "in", n=2)
    recipe = parse_recipe(recipe_dict(base, experts, "task_arithmetic", tmp_path / "out"))
    fetched = fetch_recipe(recipe)
    assert [m.label for m in fetched] == ["base", experts[0].name, experts[1].name]
    for m, folder in zip(fetched, [base, *experts], strict=True):
        with open_checkpoint(folder) as ckpt:
            assert m.content_hash == ckpt.content_hash()
            assert m.nbytes == ckpt.nbytes
        assert m.files == ("model.safetensors",)


def test_trailing_bytes_are_refused_naming_the_file(tmp_path: Path) -> None:
    base, _ = family(tmp_path / "in", n=1)
    with open(base / "model.safetensors", "ab") as fh:
        fh.write(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .* trailing bytes"):
        fetch_model("base", str(base))


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    base, _ = family(tmp_path / "in", n=1)
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        fetch_model("base", str(base))


def test_staging_copies_once_and_keeps_labels(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    base, experts = family(tmp_path / "in", n=2)
    recipe = parse_recipe(recipe_dict(base, experts, "task_arithmetic", tmp_path / "out"))
    fetched = fetch_recipe(recipe)
    cache = tmp_path / "cache"
    local = {m.label: stage_model(m, cache) for m in fetched}
    again = {m.label: stage_model(m, cache) for m in fetched}
    assert local == again
    assert len(list(cache.iterdir())) == 3
    assert set(local) == {m.label for m in fetched}
    for m in fetched:
        assert fetch_model(m.label, local[m.label]).content_hash == m.content_hash


def test_discovery_lists_finished_checkpoints_only(tmp_path: Path) -> None:
    _, experts = family(tmp_path / "drop", n=2)
    (tmp_path / "drop" / ".half-written").mkdir()
    (tmp_path / "drop" / ".half-written" / "model.safetensors").write_bytes(b"")
    sharded = tmp_path / "drop" / "sharded"
    sharded.mkdir()
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "model-00001-of-00002.safetensors").write_bytes(b"")  # second shard not there yet
    (tmp_path / "drop" / "notes").mkdir()
    found = discover_checkpoints(str(tmp_path / "drop"))
    assert found == sorted((e.name, str(e)) for e in [tmp_path / "drop" / "base", *experts])
    assert discover_checkpoints(str(tmp_path / "missing")) == []
