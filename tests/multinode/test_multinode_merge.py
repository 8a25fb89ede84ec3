"""Merges on a real three-node Ray cluster (``cluster``: head and two workers, each in its own
network namespace) read their inputs from SeaweedFS and write their output there, byte for
byte what the local executor writes, for every method family; a worker node killed in the
middle of a merge still gives those bytes, and a merge that cannot finish commits nothing.

The driver is ``amalgam merge RECIPE --executor ray`` run inside the head namespace with
``RAY_ADDRESS`` pointing at the head: the tests see the engine only through its CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from zoo.conftest import zoo_tiny

from amalgam.engine import MergeOptions, run_merge
from amalgam.engine.ray_executor import UNIT_RETRIES
from amalgam.recipe import load_recipe
from amalgam.statistics import compute_statistics
from amalgam.zoo import Zoo
from tests.faults.kills import KILLPOINT, REPO, left_at, work_folders
from tests.multinode.cluster import Cluster

__all__ = ["zoo_tiny"]

pytestmark = pytest.mark.slow

BUCKET = "multinode"
EXPERTS = ["zoo_mulmod", "zoo_compare"]
SHARD = 200_000  # three shards of a tiny-zoo merge: three Ray tasks, over both workers
#: Bytes a worker that ran a shard downloads at least (its part of three inputs).
UNIT_BYTES = 150_000
#: --unit-size that cuts each shard into parts
PART_BYTES = 60_000


@pytest.fixture(scope="module")
def inputs(cluster: Cluster, zoo_tiny: Zoo, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny zoo's base and two experts, their Gram statistics, uploaded to SeaweedFS;
    returns ``{name: s3 uri}``."""
    assert cluster.s3 is not None
    fs = cluster.s3.filesystem()
    cluster.s3.make_bucket(BUCKET)
    models = {"base": zoo_tiny.base, **{e: zoo_tiny.experts[e] for e in EXPERTS}}
    uris = {}
    for name, folder in models.items():
        fs.put(f"{folder}/", f"{BUCKET}/in/{name}/", recursive=True)
        uris[name] = f"s3://{BUCKET}/in/{name}"
    stats = tmp_path_factory.mktemp("stats")
    for e in EXPERTS:
        art = stats / f"{e}-gram.safetensors"
        data = str(zoo_tiny.tasks_dir / e)
        compute_statistics(str(zoo_tiny.experts[e]), data, "gram", {"samples": 16}, str(art))
        fs.put(str(art), f"{BUCKET}/in/{art.name}")
        uris[f"{e}-gram"] = f"s3://{BUCKET}/in/{art.name}"
    return uris


def recipe(cluster: Cluster, inputs: dict, method: str, params: dict | None = None) -> dict:
    """A merge of the two experts on SeaweedFS (over their base unless data-driven)."""
    assert cluster.s3 is not None
    body: dict[str, Any] = {
        "method": method,
        "models": [{"uri": inputs[e]} for e in EXPERTS],
        "params": params or {},
        "dtype": "float32",
        "output": f"s3://{BUCKET}/unused",
        "max_shard_size": SHARD,
        "storage_options": cluster.s3.storage_options(),
    }
    if method == "regmean":
        for spec, e in zip(body["models"], EXPERTS, strict=True):
            spec["statistics"] = inputs[f"{e}-gram"]
    else:
        body["base"] = inputs["base"]
    return body


def write_recipe(folder: Path, body: dict) -> Path:
    path = folder / f"recipe-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def merge_on_ray(
    cluster: Cluster,
    path: Path,
    output: str,
    home: Path,
    worker_env: dict | None = None,
    unit_size: int | None = None,
) -> subprocess.CompletedProcess:
    """``amalgam merge PATH --executor ray --output OUTPUT`` as a driver in the head namespace;
    ``worker_env``: environment variables for the Ray workers of this job; ``unit_size``: the
    input bytes per Ray task (default: the CLI's)."""
    extra = {"AMALGAM_HOME": str(home)}
    if worker_env:
        job = {"runtime_env": {"env_vars": worker_env}}
        extra["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(job)
    args = [sys.executable, "-m", "amalgam.cli", "merge", str(path), "--executor", "ray"]
    if unit_size is not None:
        args += ["--unit-size", str(unit_size)]
    return cluster.run(
        "head",
        [*args, "--output", output],
        env=cluster.driver_env(extra),
        cwd=REPO,
        check=False,
        timeout=300,
    )


def digest(cluster: Cluster, uri: str) -> dict[str, str]:
    """sha256 of every file under ``uri`` (the commit record included), by relative path."""
    assert cluster.s3 is not None
    fs = cluster.s3.filesystem()
    root = uri.removeprefix("s3://")
    fs.invalidate_cache()
    return {
        str(PurePosixPath(p).relative_to(root)): hashlib.sha256(fs.cat_file(p)).hexdigest()
        for p in sorted(fs.find(root))
    }


def local_merge(path: Path, output: str) -> None:
    run_merge(load_recipe(path), MergeOptions(output=output, executor="local", device="cpu"))


def received(cluster: Cluster) -> dict[str, int]:
    return {name: node.bytes_received() for name, node in cluster.nodes.items()}


FAMILIES = [
    pytest.param("task_arithmetic", {"lambda": 0.5}, id="per-tensor"),
    pytest.param("ties", {"trim": "model", "density": 0.5}, id="whole-model-statistics"),
    pytest.param("opcm", {}, id="continual"),
    pytest.param("regmean", {"alpha": 0.9}, id="data-driven"),
]


@pytest.mark.parametrize(("method", "params"), FAMILIES)
def test_every_method_family_gives_the_local_bytes_on_three_nodes(
    cluster: Cluster, inputs: dict, tmp_path: Path, method: str, params: dict
) -> None:
    path = write_recipe(tmp_path, recipe(cluster, inputs, method, params))
    run = f"s3://{BUCKET}/{tmp_path.name}"
    local_merge(path, f"{run}/local")
    local = digest(cluster, f"{run}/local")
    assert sum(name.endswith(".safetensors") for name in local) >= 3, local
    assert "amalgam-commit.json" in local
    # shards written whole by a task each, then shards cut into parts the driver puts together
    for label, unit in (("shards", None), ("parts", PART_BYTES)):
        before = received(cluster)
        done = merge_on_ray(cluster, path, f"{run}/{label}", tmp_path / label, unit_size=unit)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        after = received(cluster)
        assert digest(cluster, f"{run}/{label}") == local, label
        # Both workers read inputs from S3: the tasks ran on more than one node.
        for worker in ("w1", "w2"):
            assert after[worker] - before[worker] > UNIT_BYTES, (label, worker, before, after)


def test_a_local_output_on_several_nodes_is_refused_before_any_work(
    cluster: Cluster, inputs: dict, tmp_path: Path
) -> None:
    """Workers on other nodes would write to their own disks: refused, naming the path."""
    path = write_recipe(tmp_path, recipe(cluster, inputs, "task_arithmetic"))
    out = tmp_path / "local-out"
    done = merge_on_ray(cluster, path, str(out), tmp_path / "home")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the Ray cluster has 3 nodes") and str(out) in last, last
    assert not out.exists() and list(tmp_path.glob(".local-out*")) == []


def test_a_merge_whose_workers_always_die_commits_nothing(
    cluster: Cluster, inputs: dict, tmp_path: Path
) -> None:
    """Every Ray worker of this job dies (SIGKILL) in the middle of its shard, on whichever
    node: the retries run out, one ``error:`` line, exit 2, nothing at the output URI."""
    path = write_recipe(tmp_path, recipe(cluster, inputs, "task_arithmetic"))
    out = f"s3://{BUCKET}/{tmp_path.name}/ray"
    pythonpath = os.pathsep.join(p for p in (str(KILLPOINT), os.environ.get("PYTHONPATH")) if p)
    kill = {"PYTHONPATH": pythonpath, "AMALGAM_TEST_KILL": KILL_MID_SHARD}
    done = merge_on_ray(cluster, path, out, tmp_path / "home", worker_env=kill)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and ".safetensors" in last, done.stderr[-3000:]
    assert f"lost {UNIT_RETRIES + 1} times" in last, last  # the retries ran out
    options = cluster.s3.storage_options()
    assert left_at(out, **options)[0] == "absent"
    assert work_folders(f"s3://{BUCKET}/{tmp_path.name}", **options) == []


#: The third tensor a worker writes: inside a shard, never its first or last.
KILL_MID_SHARD = "amalgam.writer:ShardWriter.write:3"
#: Each worker's link while a node is killed: slow enough that shards are still being read.
SLOW_MB_S = 0.1


def test_a_worker_node_killed_mid_merge_leaves_the_local_bytes(
    cluster: Cluster, inputs: dict, tmp_path: Path
) -> None:
    """Worker ``w1``'s raylet is killed (SIGKILL) once it has started reading its shard: the
    shards it held run again on ``w2`` and the output is the local executor's, complete.
    Runs last in this module: ``w1`` stays dead."""
    path = write_recipe(tmp_path, recipe(cluster, inputs, "ties", {"density": 0.5}))
    run = f"s3://{BUCKET}/{tmp_path.name}"
    local_merge(path, f"{run}/local")
    for worker in ("w1", "w2"):
        cluster.limit(worker, SLOW_MB_S)
    start = cluster.nodes["w1"].bytes_received()
    killed: list[float] = []

    def kill_when_reading() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if cluster.nodes["w1"].bytes_received() - start > UNIT_BYTES // 3:
                cluster.kill_node("w1")
                killed.append(time.monotonic())
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_when_reading, daemon=True)
    try:
        killer.start()
        done = merge_on_ray(cluster, path, f"{run}/ray", tmp_path / "home")
        killer.join(5)
    finally:
        for worker in ("w1", "w2"):
            cluster.limit(worker, None)
    assert killed, "w1 never started reading: nothing was killed"
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert digest(cluster, f"{run}/ray") == digest(cluster, f"{run}/local")
    assert work_folders(run, **cluster.s3.storage_options()) == []
