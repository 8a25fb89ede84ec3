"""The tiny and MiniLM zoos, built once per session (cached in $AMALGAM_HOME/zoo or
<repo>/.amalgam/zoo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from amalgam.zoo import Zoo, build_zoo
from amalgam.zoo.minilm import EmbeddingZoo, build_embedding_zoo

REPO = Path(__file__).resolve().parents[2]


def zoo_home() -> Path:
    return Path(os.environ.get("AMALGAM_HOME", REPO / ".amalgam")) / "zoo"


@pytest.fixture(scope="session")
def zoo_tiny() -> Zoo:
    return build_zoo(zoo_home(), profile="tiny", log=lambda _: None)


@pytest.fixture(scope="session")
def zoo_minilm() -> EmbeddingZoo:
    """all-MiniLM-L6-v2 and two fine-tunes of it (about 1.5 CPU minutes when not cached)."""
    return build_embedding_zoo(zoo_home(), log=lambda _: None)
