"""Flow tests: a real Prefect server (temporary SQLite), MLflow on SQLite, the tiny zoo."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from zoo.conftest import zoo_tiny

# Prefect reads its settings when first imported: set them before any test imports it.
_PREFECT_HOME = tempfile.mkdtemp(prefix="amalgam-prefect-")
FLOW_ENV = {
    "PREFECT_HOME": _PREFECT_HOME,
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TQDM_DISABLE": "1",
}
os.environ.update(FLOW_ENV)

__all__ = ["zoo_tiny"]


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[None]:
    """One temporary Prefect server (and database) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh MLflow store: SQLite database and artifact folder under the test's tmp dir."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
