"""Fixtures for the statistics tests: a fresh $AMALGAM_HOME, tiny models, their data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.statistics.tiny_models import RECORDS, tiny_llama, write_jsonl


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $AMALGAM_HOME, so the statistics cache starts empty."""
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def models(tmp_path: Path) -> list[Path]:
    return [tiny_llama(tmp_path / f"model{i}", seed=i) for i in range(2)]


@pytest.fixture
def data(tmp_path: Path) -> list[Path]:
    """One jsonl per model (different records)."""
    return [
        write_jsonl(tmp_path / "data0.jsonl", RECORDS),
        write_jsonl(tmp_path / "data1.jsonl", RECORDS[::-1][:4]),
    ]
