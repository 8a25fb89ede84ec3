"""A real ``mlflow server`` process on loopback for tests: started, waited for, stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MlflowServer:
    """A running ``mlflow server`` serving ``url`` from the SQLite database ``db``."""

    url: str
    db: Path
    log_path: Path
    process: subprocess.Popen

    def stop(self) -> None:
        """Kill the server's process group (the server and its workers) and wait for it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)


def start_mlflow_server(root: Path, port: int, db: Path | None = None) -> MlflowServer:
    """``mlflow server`` on 127.0.0.1:``port`` over ``db`` (default ``root/mlflow.db``),
    artifacts served from ``root/artifacts``; healthy when returned (RuntimeError otherwise)."""
    root.mkdir(parents=True, exist_ok=True)
    db = db or root / "mlflow.db"
    log_path = root / f"server-{port}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--host=127.0.0.1",
                f"--port={port}",
                "--workers=1",
                f"--backend-store-uri=sqlite:///{db}",
                f"--artifacts-destination={root / 'artifacts'}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = MlflowServer(f"http://127.0.0.1:{port}", db, log_path, process)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError("mlflow server not healthy after 120 s")
        time.sleep(0.3)
