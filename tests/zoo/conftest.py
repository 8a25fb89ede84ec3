"""The tiny zoo, built once per session (cached in $AMALGAM_HOME/zoo or <repo>/.amalgam/zoo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from amalgam.zoo import Zoo, build_zoo

REPO = Path(__file__).resolve().parents[2]


def zoo_home() -> Path:
    return Path(os.environ.get("AMALGAM_HOME", REPO / ".amalgam")) / "zoo"


@pytest.fixture(scope="session")
def zoo_tiny() -> Zoo:
    return build_zoo(zoo_home(), profile="tiny", log=lambda _: None)
