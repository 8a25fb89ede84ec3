"""``amalgam`` commands of the orchestration layer, each in a process of its own, as a user
runs them: the fault tests read their exit code, output and the stores they leave."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def amalgam_process(
    args: list[str], work: Path, extra_env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``amalgam ARGS`` run in ``work/cwd`` with its homes under ``work`` (``home``,
    ``prefect``), which it creates itself when they do not exist."""
    env = {
        **os.environ,
        "AMALGAM_HOME": str(work / "home"),
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_TO_API_ENABLED": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TQDM_DISABLE": "1",
        **(extra_env or {}),
    }
    (work / "cwd").mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "amalgam_flows.cli", *args],
        cwd=work / "cwd",
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def printed_result(out: str) -> dict:
    """The JSON result a command printed (the first ``{`` ... ``}`` block of its output)."""
    lines = out.splitlines()
    first = lines.index("{")
    return json.loads("\n".join(lines[first : lines.index("}", first) + 1]))


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line of a command that failed cleanly: exit 2, no traceback."""
    shown = done.stdout + done.stderr
    assert done.returncode == 2, shown[-3000:]
    assert "Traceback" not in shown, shown[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]
