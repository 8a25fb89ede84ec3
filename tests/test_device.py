"""One device rule for merges, statistics and evaluation: CUDA asked for and absent is an error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from amalgam.device import DeviceError, compute_threads, load_causal_lm, pick_device
from amalgam.engine import MergeOptions, run_merge
from amalgam.evaluate.harness import evaluate_model
from amalgam.recipe import parse_recipe
from amalgam.statistics import compute_statistics
from tests.helpers import family, recipe_dict


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_cuda_and_names_pass_through(no_cuda) -> None:
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="'gpu0' is not a device name"):
        pick_device("gpu0")


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_an_error_not_a_fallback(no_cuda, device: str) -> None:
    with pytest.raises(DeviceError, match=f"device: {device} requested but no CUDA device"):
        pick_device(device)


def test_every_user_of_a_device_refuses_missing_cuda(no_cuda, tmp_path: Path) -> None:
    base, experts = family(tmp_path / "in")
    recipe = parse_recipe(recipe_dict(base, experts, "linear", tmp_path / "out"))
    with pytest.raises(DeviceError):
        run_merge(recipe, MergeOptions(device="cuda"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(DeviceError):
        load_causal_lm(base, "cuda")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b"}\n')
    with pytest.raises(DeviceError):
        compute_statistics(
            str(base), str(data), "gram", {"samples": 1}, str(tmp_path / "s"), device="cuda"
        )
    with pytest.raises(DeviceError):
        evaluate_model(base, tmp_path, device="cuda")


def test_compute_threads_restores_the_callers_setting() -> None:
    before = torch.get_num_threads()
    with compute_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
