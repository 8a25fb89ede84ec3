"""amalgam serve: the nightly flow on a cron schedule, served from this process.

Prefect's ephemeral server runs no scheduler, so without ``PREFECT_API_URL`` a local
``prefect server start`` (loopback, state under ``$AMALGAM_HOME/prefect``) is started first
and stopped after the flow server; with ``PREFECT_API_URL`` set, that server is used.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from amalgam.errors import AmalgamError
from amalgam.storage import amalgam_home


@contextlib.contextmanager
def prefect_server(port: int = 4200, timeout: float = 120.0) -> Iterator[str]:
    """A ``prefect server start`` on 127.0.0.1:``port`` for the duration of the block."""
    home = amalgam_home() / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "ab")  # noqa: SIM115 - closed when the server stops
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AmalgamError(f"prefect server exited early; see {home / 'server.log'}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(url + "/health", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise AmalgamError(f"prefect server not healthy at {url} after {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(process)
        log.close()


def stop_group(process: subprocess.Popen) -> None:
    """Stop ``process`` and the processes it started (its session's process group): SIGTERM,
    then SIGKILL after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def free_port(preferred: int) -> int:
    """``preferred`` when nothing listens on it on loopback, else a free port."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_nightly(config: Path, cron: str, port: int = 4200) -> None:
    """Serve the nightly flow for ``config`` on ``cron`` until interrupted."""
    if os.environ.get("PREFECT_API_URL"):
        _serve(config, cron)
        return
    with prefect_server(free_port(port)) as url:
        os.environ["PREFECT_API_URL"] = url
        print(f"Prefect UI: {url.removesuffix('/api')}  (runs of 'nightly' appear there)")
        _serve(config, cron)


def _serve(config: Path, cron: str) -> None:
    # Prefect reads PREFECT_API_URL when first imported. The nightly flow is loaded from its
    # entrypoint (as a deployment names it), not imported: flows do not import flows.
    from prefect.flows import load_flow_from_entrypoint  # lazy: after PREFECT_API_URL is set

    nightly = load_flow_from_entrypoint(f"{Path(__file__).with_name('nightly.py')}:nightly")
    nightly.serve(name="nightly", cron=cron, parameters={"config": str(Path(config).resolve())})
