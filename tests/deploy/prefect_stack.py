"""A Prefect stack as a platform team runs it, driven through its command line and REST API:
``prefect`` CLI calls against a server, a worker process polling a pool, flow-run polling."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amalgam_flows.serve import stop_group

FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class PrefectStack:
    """The CLI and REST API of the Prefect server at ``api_url``; every command runs in
    ``cwd`` with ``env`` (which points ``PREFECT_API_URL`` at the server)."""

    api_url: str
    env: dict[str, str]
    cwd: Path

    def cli(self, *args: str, timeout: float = 120) -> str:
        """``prefect ARGS...``; its output, or an assertion error that shows it."""
        done = subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{output}"
        return output

    def api(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """GET ``path`` of the REST API, or POST ``body`` to it; the decoded JSON reply."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.api_url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.load(reply)

    def deployments(self) -> dict[str, dict[str, Any]]:
        """Every deployment on the server by ``flow-name/deployment-name``."""
        flows = {f["id"]: f["name"] for f in self.api("/flows/filter", {})}
        return {
            f"{flows[d['flow_id']]}/{d['name']}": d for d in self.api("/deployments/filter", {})
        }

    def run_deployment(self, name: str, *params: str) -> str:
        """``prefect deployment run NAME --param P=V...``: the new flow run's id."""
        args = [a for p in params for a in ("--param", p)]
        (run_id,) = re.findall(r"UUID: ([0-9a-f-]{36})", self.cli("deployment", "run", name, *args))
        return run_id

    def wait_for_run(
        self, run_id: str, timeout: float, log: Path, expect: str = "COMPLETED"
    ) -> dict[str, Any]:
        """The flow run once it reaches a final state; fails showing ``log`` (the worker's) when
        it ends in another state than ``expect`` or takes longer than ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.api(f"/flow_runs/{run_id}")
            state = run["state"]["type"]
            if state in FINAL_STATES or time.monotonic() > deadline:
                break
            time.sleep(1)
        if state != expect:
            message = run["state"].get("message") or ""
            raise AssertionError(
                f"flow run {run_id} is {state} ({message}); worker log:\n{log.read_text()}"
            )
        return run


@contextlib.contextmanager
def worker(stack: PrefectStack, pool: str, log: Path) -> Iterator[subprocess.Popen]:
    """``prefect worker start --pool POOL`` for the duration of the block (output to ``log``);
    stopped by its process group, which holds the flow-run processes it started."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool],
            cwd=stack.cwd,
            env=stack.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            stop_group(process)
