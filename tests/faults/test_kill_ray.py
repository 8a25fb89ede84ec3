"""A Ray worker killed with SIGKILL in the middle of its shard (``killpoint/`` in the worker
processes, which inherit the environment of the Ray the merge starts): Ray runs the shard's
task again and the output is byte-identical to the local executor's; a shard whose worker
dies on every run ends in one ``error:`` line, exit 2, and nothing left."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from zoo.conftest import zoo_tiny

from amalgam.engine import MergeOptions, run_merge
from amalgam.engine.ray_executor import UNIT_RETRIES
from amalgam.recipe import load_recipe
from tests.faults.kills import (
    Place,
    process_env,
    recipe,
    run_process,
    weights,
    work_folders,
    write_recipe,
)

__all__ = ["zoo_tiny"]

#: The third tensor a worker writes: inside a shard (of 7 tensors), never its first or last.
KILL = "amalgam.writer:ShardWriter.write:3"


@pytest.fixture
def short(tmp_path: Path) -> Iterator[Path]:
    """A folder with a short path: Ray's session folder holds unix sockets (107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="kill-ray-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def merge_on_ray(path: Path, out: Path, home: Path, once: Path | None) -> tuple[int, str]:
    command = ["-m", "amalgam_flows.cli", "merge", str(path), "--executor", "ray"]
    done = run_process([*command, "--output", str(out)], process_env(home, KILL, once))
    return done.code, done.tail


@pytest.mark.slow
def test_a_worker_killed_mid_shard_is_retried_to_the_local_bytes(
    zoo_tiny, tmp_path: Path, short: Path
) -> None:
    path = write_recipe(tmp_path, recipe(zoo_tiny, Place(str(tmp_path / "out"), {})))
    run_merge(load_recipe(path), MergeOptions(output=str(tmp_path / "local"), executor="local"))
    killed = tmp_path / "killed-worker"  # the one worker that dies writes its pid here

    code, tail = merge_on_ray(path, tmp_path / "ray", short, once=killed)
    assert code == 0, tail
    pid = int(killed.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # it died, and the merge finished without it
    local = weights(str(tmp_path / "local"))
    assert len(local) == 4 and weights(str(tmp_path / "ray")) == local
    assert work_folders(str(tmp_path)) == []


@pytest.mark.slow
def test_a_shard_whose_worker_always_dies_fails_with_one_line(
    zoo_tiny, tmp_path: Path, short: Path
) -> None:
    path = write_recipe(tmp_path, recipe(zoo_tiny, Place(str(tmp_path / "out"), {})))
    code, tail = merge_on_ray(path, tmp_path / "ray", short, once=None)
    assert code == 2, tail
    err = tail.strip().splitlines()
    assert err[-1].startswith("error: ") and f"lost {UNIT_RETRIES + 1} times" in err[-1], tail
    assert ".safetensors" in err[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no output, no staging
