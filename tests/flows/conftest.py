"""Flow tests: a real Prefect server (temporary SQLite), MLflow on SQLite, the tiny zoo."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from zoo.conftest import zoo_tiny

# Prefect reads its settings when first imported: set them before any test imports it.
_PREFECT_HOME = tempfile.mkdtemp(prefix="amalgam-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
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


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect server (and database) for every in-process flow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh MLflow store: SQLite database and artifact folder under the test's tmp dir."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on loopback (SQLite backend, artifacts served by the server)."""
    from mlflowserver import start_mlflow_server
    from s3server import free_ports

    try:
        server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), *free_ports(1))
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server.url
    server.stop()
