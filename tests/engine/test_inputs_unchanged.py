"""Inputs that change while they are read: a clear error and no output, never a model mixing two
versions of a file (nor a crash on a truncated mapping)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from amalgam.checkpoint import Checkpoint
from amalgam.engine import MergeOptions, run_merge
from amalgam.errors import CheckpointError
from amalgam.reads import MAP_MIN_BYTES
from amalgam.recipe import parse_recipe
from tests.helpers import family, recipe_dict, write_model

BIG = MAP_MIN_BYTES // 4 + 17  # float32 entries: a mapped read


def rewrite_in_place(path: Path) -> None:
    """Flip one byte near the end of ``path`` (same inode, same size, a later mtime)."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(st.st_size - 3)
        byte = fh.read(1)
        fh.seek(st.st_size - 3)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def big_model(folder: Path) -> Path:
    write_model(folder, {"w": torch.arange(BIG, dtype=torch.float32), "b": torch.ones(3)})
    return folder / "model.safetensors"


def test_a_file_truncated_after_opening_is_an_error_not_a_crash(tmp_path: Path) -> None:
    file = big_model(tmp_path / "m")
    ckpt = Checkpoint(str(tmp_path / "m"))
    ckpt.view("w")  # the file is open
    with open(file, "r+b") as fh:
        fh.truncate(file.stat().st_size - 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated .*'w'"):
        ckpt.view("w")  # a mapping past the end would kill the process (SIGBUS)
    ckpt.close()


def test_a_file_rewritten_in_place_is_detected(tmp_path: Path) -> None:
    file = big_model(tmp_path / "m")
    with Checkpoint(str(tmp_path / "m")) as ckpt:
        assert torch.equal(ckpt.view("w"), torch.arange(BIG, dtype=torch.float32))
        ckpt.check_unchanged()
        rewrite_in_place(file)
        with pytest.raises(CheckpointError, match=r"model\.safetensors: changed since"):
            ckpt.check_unchanged()


def test_a_file_replaced_before_its_first_read_is_refused(tmp_path: Path) -> None:
    file = big_model(tmp_path / "m")
    with Checkpoint(str(tmp_path / "m")) as ckpt:
        other = big_model(tmp_path / "other")
        os.replace(other, file)  # a new inode under the same name: its layout may differ
        with pytest.raises(CheckpointError, match="changed since it was opened"):
            ckpt.view("w")


def test_a_file_replaced_after_it_was_opened_for_reading_is_fine(tmp_path: Path) -> None:
    file = big_model(tmp_path / "m")
    with Checkpoint(str(tmp_path / "m")) as ckpt:
        ckpt.view("w")  # the open file is the one whose header was read
        write_model(tmp_path / "other", {"w": torch.zeros(BIG), "b": torch.ones(3)})
        os.replace(tmp_path / "other" / "model.safetensors", file)
        assert torch.equal(ckpt.view("w"), torch.arange(BIG, dtype=torch.float32))
        ckpt.check_unchanged()  # every read came from the old file, whole


def test_a_merge_whose_input_is_rewritten_meanwhile_writes_nothing(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "in")
    out = tmp_path / "out"
    recipe = parse_recipe(recipe_dict(base, experts, "task_arithmetic", out))
    victim = experts[1] / "model.safetensors"
    rewritten = []

    def progress(nbytes: int, tensors: int) -> None:  # after the first merged tensor
        if not rewritten:
            rewrite_in_place(victim)
            rewritten.append(True)

    with pytest.raises(CheckpointError, match=rf"{experts[1].name}/model.safetensors: changed"):
        run_merge(recipe, MergeOptions(device="cpu"), progress)
    assert rewritten and not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_an_object_replaced_on_the_store_during_a_merge_writes_nothing(s3, tmp_path: Path) -> None:
    bucket = s3.make_bucket(f"changed-{uuid.uuid4().hex[:8]}")
    fs = s3.filesystem()
    base, experts = family(tmp_path / "in")
    uris = []
    for folder in (base, *experts):
        fs.put(f"{folder}/", f"{bucket}/{folder.name}", recursive=True)
        uris.append(f"s3://{bucket}/{folder.name}")
    data = {
        "method": "task_arithmetic",
        "base": uris[0],
        "models": [{"uri": u} for u in uris[1:]],
        "output": str(tmp_path / "out"),
        "storage_options": s3.storage_options(),
    }
    victim = f"{bucket}/{experts[0].name}/model.safetensors"
    replaced = []

    def progress(nbytes: int, tensors: int) -> None:
        if not replaced:
            data = bytearray(fs.cat_file(victim))
            data[-3] ^= 0xFF  # a new object under the same key (its ETag differs)
            fs.pipe_file(victim, bytes(data))
            replaced.append(True)

    with pytest.raises(CheckpointError, match="changed since it was opened"):
        run_merge(parse_recipe(data), MergeOptions(device="cpu"), progress)
    assert replaced and not (tmp_path / "out").exists()
