"""Merges on a CUDA device with the overlapped copies (pinned memory, a copy stream): the same
bytes as the synchronous copies and as the CPU. Needs a CUDA device (skipped elsewhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amalgam.engine import MergeOptions, run_merge
from amalgam.recipe import parse_recipe
from tests.helpers import family, recipe_dict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# method, extra recipe fields, merge options: the per-tensor kernels, a random mask, a
# whole-model statistics pass, and a tensor merged one model at a time (a tiny memory budget)
CASES = {
    "linear": ("linear", {}, {}),
    "task_arithmetic": ("task_arithmetic", {"parameters": {"lambda": 0.5}}, {}),
    "ties": ("ties", {"parameters": {"density": 0.3}}, {}),
    "ties_model_trim": ("ties", {"parameters": {"density": 0.3, "trim": "model"}}, {}),
    "dare_ties": ("dare_ties", {"parameters": {"density": 0.5}, "seed": 7}, {}),
    "streamed": ("task_arithmetic", {}, {"memory_budget": 1 << 12}),
}


def merged(
    tmp_path: Path,
    case: str,
    device: str,
    overlap: bool,
    monkeypatch: pytest.MonkeyPatch,
    experts: int = 3,
) -> dict[str, torch.Tensor]:
    method, extra, options = CASES[case]
    base, models = family(tmp_path / f"in{experts}", n=experts)
    out = tmp_path / f"{case}-{device}-{overlap}"
    monkeypatch.setenv("AMALGAM_CUDA_OVERLAP", "1" if overlap else "0")
    recipe = parse_recipe(recipe_dict(base, models, method, out, **extra))
    run_merge(recipe, MergeOptions(device=device, **options))
    return load_file(str(out / "model.safetensors"))


def assert_same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_overlapped_copies_merge_the_same_bytes_as_the_cpu(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    experts = 5 if case == "streamed" else 3  # one model at a time from five inputs on
    on = merged(tmp_path, case, "cuda", True, monkeypatch, experts)
    off = merged(tmp_path, case, "cuda", False, monkeypatch, experts)
    cpu = merged(tmp_path, case, "cpu", True, monkeypatch, experts)
    assert_same_bytes(on, off)
    assert_same_bytes(on, cpu)
