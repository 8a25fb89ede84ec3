"""amalgam serve: a local Prefect server, the nightly flow served on a cron schedule, a
scheduled run that really happens, and nothing left running after SIGTERM."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import FLOW_ENV
from recipes import nightly_config

from amalgam.registry import Registry

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_serve_runs_nightly_on_its_schedule_and_stops_cleanly(zoo_tiny, tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    shutil.copytree(zoo_tiny.experts["zoo_compare"], drop / "zoo_compare")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump(nightly_config(zoo_tiny, str(drop), tracking, tmp_path / "w")))
    env = {**os.environ, **FLOW_ENV, "AMALGAM_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amalgam_flows.cli",
            "serve",
            "--config",
            str(config),
            "--cron",
            "* * * * *",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    started: list[psutil.Process] = []
    try:
        registry = Registry(tracking)
        deadline = time.monotonic() + 240  # server start, then the next whole minute
        while registry.alias_version("zoo", "champion") is None:
            assert serve.poll() is None, "amalgam serve exited"
            assert time.monotonic() < deadline, "no scheduled nightly run finished in time"
            started = list({*started, *psutil.Process(serve.pid).children(recursive=True)})
            time.sleep(1)
        assert any("prefect" in " ".join(p.cmdline()) for p in started if p.is_running())
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:  # on failure: stop what this test started, by PID
        if serve.poll() is None:
            serve.kill()
        for p in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
