"""Faults of the output's file system (a real tmpfs mounted by the test): a full disk and a
read-only one end in one ``error:`` line and exit 2, with nothing half-written left."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import run_cli, write_model


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[callable]:
    """``mount(options)`` -> a fresh tmpfs folder mounted with ``options``; unmounted after."""
    mounted: list[Path] = []

    def make(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)])
        if done.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def big_family(root: Path) -> tuple[Path, list[Path]]:
    """A base and two experts of 1 MB each (float32), larger than the disks below."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(512, 512, generator=g)}
    paths = [write_model(root / "base", base)]
    for i in range(2):
        paths.append(write_model(root / f"e{i}", {"w": base["w"] + 0.01 * i}))
    return paths[0], paths[1:]


def merge_into(tmp_path, out: Path, monkeypatch, capsys) -> tuple[int, str]:
    base, experts = big_family(tmp_path / "in")
    recipe = {
        "method": "task_arithmetic",
        "base": str(base),
        "models": [{"uri": str(e)} for e in experts],
        "output": str(out),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli(["merge", str(path)], monkeypatch, capsys)
    return code, err


def test_full_disk(tmp_path, mount, monkeypatch, capsys) -> None:
    disk = mount("size=256k")
    code, err = merge_into(tmp_path, disk / "merged", monkeypatch, capsys)
    assert code == 2
    assert err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "No space left on device" in err and "merged" in err
    assert list(disk.iterdir()) == []  # no output, no staging folder


def test_read_only_disk(tmp_path, mount, monkeypatch, capsys) -> None:
    disk = mount("size=4m,ro")
    code, err = merge_into(tmp_path, disk / "merged", monkeypatch, capsys)
    assert code == 2
    assert err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "Read-only file system" in err
    assert list(disk.iterdir()) == []
