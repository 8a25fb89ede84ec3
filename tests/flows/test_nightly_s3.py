"""nightly against a real S3 bucket, in real processes: killed mid-merge and run again twice
at once, it ends with the same model, one registered version and one promotion."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FLOW_ENV
from recipes import nightly_config
from s3server import CountingProxy

from amalgam.checkpoint import open_checkpoint
from amalgam.engine import MergeOptions, run_merge
from amalgam.recipe import parse_recipe
from amalgam.registry import Registry

REPO = Path(__file__).resolve().parents[2]
EXPERTS = ["zoo_compare", "zoo_mulmod"]


class SlowProxy(CountingProxy):
    """The counting proxy, delaying each chunk it forwards while ``delay`` is set: a slow
    store, so that a merge reading from it takes long enough to be killed half-way."""

    delay: float = 0.0

    def _pump(self, src, dst, down, left) -> None:  # type: ignore[no-untyped-def]
        real = src.recv

        def slow_recv(n: int) -> bytes:
            if down and self.delay:
                time.sleep(self.delay)
            return real(n)

        class Wrapped:
            recv = staticmethod(slow_recv)

            def __getattr__(self, name):  # type: ignore[no-untyped-def]
                return getattr(src, name)

        super()._pump(Wrapped(), dst, down, left)  # type: ignore[arg-type]


def start(config: Path, home: Path, prefect_home: Path) -> subprocess.Popen:
    env = {**os.environ, **FLOW_ENV, "PREFECT_HOME": str(prefect_home), "AMALGAM_HOME": str(home)}
    prefect_home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "amalgam_flows.cli", "nightly", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def result_of(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=400)
    assert process.returncode == 0, err[-3000:]
    lines = out.splitlines()
    first = lines.index("{")
    return json.loads("\n".join(lines[first:]))


@pytest.mark.slow
def test_nightly_killed_mid_merge_then_run_twice_at_once(zoo_tiny, s3, tmp_path: Path) -> None:
    bucket = s3.make_bucket("nightly-drop")
    fs = s3.filesystem()
    for e in EXPERTS:
        fs.put(str(zoo_tiny.experts[e]) + "/", f"{bucket}/experts/{e}/", recursive=True)
    proxy = SlowProxy((s3.endpoint_url.split(":")[1][2:], int(s3.endpoint_url.rsplit(":", 1)[1])))
    proxy.start()
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    work = tmp_path / "work"
    raw = nightly_config(
        zoo_tiny, f"s3://{bucket}/experts", tracking, work, max_negative_flip_rate=0.5
    )
    raw["recipe"]["storage_options"] = s3.storage_options(proxy.url, skip_instance_cache=True)
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump(raw))
    home = tmp_path / "home"
    try:
        proxy.delay = 0.05
        killed = start(config, home, tmp_path / "prefect-0")
        deadline = time.monotonic() + 300
        while not (work.exists() and any(p.name.startswith(".") for p in work.iterdir())):
            assert killed.poll() is None, killed.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the merge never started"
            time.sleep(0.05)
        time.sleep(1.0)  # well inside the merge: the slow store serves a tensor per 0.05 s+
        os.killpg(killed.pid, signal.SIGKILL)
        killed.communicate()
        assert not (work.exists() and any(not p.name.startswith(".") for p in work.iterdir()))

        proxy.delay = 0.0
        runs = [start(config, home, tmp_path / f"prefect-{i}") for i in (1, 2)]
        results = [result_of(p) for p in runs]
    finally:
        proxy.stop()

    assert sorted(r["status"] for r in results) == ["nothing-new", "promoted"], results
    registry = Registry(tracking)
    versions = registry.client.search_model_versions("name = 'zoo'")
    assert [str(v.version) for v in versions] == ["1"]
    assert registry.alias_version("zoo", "champion") == "1"
    runs_left = registry.client.search_runs(
        [registry.experiment_id("amalgam")], "attributes.status != 'FINISHED'"
    )
    assert runs_left == []
    # the champion holds the tensors of one uninterrupted continual merge of both experts
    recipe = parse_recipe(
        {
            **raw["recipe"],
            "storage_options": {},
            "models": [{"uri": str(zoo_tiny.experts[e])} for e in EXPERTS],
        }
    )
    direct = run_merge(recipe, MergeOptions(output=str(tmp_path / "direct"))).output
    with open_checkpoint(direct) as a, open_checkpoint(registry.model_path("zoo", "1")) as b:
        for name in a.names():
            assert torch.equal(a.tensor(name), b.tensor(name)), name
