"""Fixtures for the backdoor and DAM tests: the tiny zoo and its backdoored expert."""

from __future__ import annotations

import pytest
import torch
from zoo.conftest import zoo_tiny

from amalgam.zoo import Zoo
from amalgam.zoo.backdoor import Backdoor, build_backdoor

__all__ = ["backdoor_tiny", "zoo_tiny"]


@pytest.fixture(scope="session")
def backdoor_tiny(zoo_tiny: Zoo) -> Backdoor:
    """The tiny zoo's backdoored expert (about 10 CPU seconds when not cached)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_backdoor(zoo_tiny, log=lambda _: None)
    finally:
        torch.set_num_threads(before)
