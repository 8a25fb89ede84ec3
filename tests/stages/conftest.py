"""Stage tests: the tiny zoo and a fresh MLflow store per test."""

from __future__ import annotations

from pathlib import Path

import pytest
from zoo.conftest import zoo_tiny

__all__ = ["zoo_tiny"]


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``$AMALGAM_HOME`` (score cache, reports, locks) for the test."""
    folder = tmp_path / "home"
    monkeypatch.setenv("AMALGAM_HOME", str(folder))
    return folder
