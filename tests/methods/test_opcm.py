"""OPCM: hand-worked projections, and whole merges against a naive in-memory formulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amalgam.engine import MergeOptions, run_merge
from amalgam.engine.continual import read_state
from amalgam.methods.base import Step
from amalgam.methods.opcm import project_out, projects, split_rank
from amalgam.recipe import parse_recipe
from tests.helpers import llama_tensors, recipe_dict, write_model

from . import continual_naive as naive


@pytest.mark.parametrize(("alpha", "rho"), [(0.3, 0), (0.5, 1), (0.75, 2), (0.95, 3), (1.0, 0)])
def test_split_rank_is_first_index_past_alpha(alpha: float, rho: int) -> None:
    # cumulative shares of [4, 3, 2, 1]: 0.4, 0.7, 0.9, 1.0 (none exceeds 1.0: rho 0)
    assert split_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), alpha) == rho


def test_projection_zeroes_diagonal_and_top_left_block() -> None:
    tau = torch.arange(1.0, 10.0).reshape(3, 3)
    merged = torch.diag(torch.tensor([5.0, 3.0, 2.0]))  # shares 0.5, 0.8, 1.0
    only_diagonal = torch.tensor([[0.0, 2, 3], [4, 0, 6], [7, 8, 0]])
    assert torch.allclose(project_out(tau, merged, 0.4), only_diagonal, atol=1e-6)  # rho 0
    assert torch.allclose(project_out(tau, merged, 0.5), only_diagonal, atol=1e-6)  # rho 1
    block = torch.tensor([[0.0, 0, 3], [0, 0, 6], [7, 8, 0]])
    assert torch.allclose(project_out(tau, merged, 0.85), block, atol=1e-6)  # rho 2


def test_projection_of_wide_matrix_has_min_side_diagonal() -> None:
    tau = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    merged = torch.tensor([[2.0, 0, 0], [0, 1, 0]])
    out = project_out(tau, merged, 0.5)
    assert torch.allclose(out, torch.tensor([[0.0, 2, 3], [4, 0, 6]]), atol=1e-6)


def test_projection_of_zero_merge_is_identity() -> None:
    tau = torch.randn(4, 3)
    assert torch.equal(project_out(tau, torch.zeros(4, 3), 0.5), tau)


@pytest.mark.parametrize("shape", [(7, 7), (9, 5), (4, 10)])
def test_thin_svd_projection_equals_full_rotation(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    merged = torch.randn(shape, generator=g, dtype=torch.float64)
    tau = torch.randn(shape, generator=g, dtype=torch.float64)
    for alpha in (0.2, 0.5, 0.8):
        want = naive.rotated_projection(tau, merged, alpha)
        got = project_out(tau.float(), merged.float(), alpha)
        assert torch.allclose(got.double(), want, atol=1e-5), alpha


def test_projected_tensors_are_linear_weights_only() -> None:
    w = torch.zeros(3, 3)
    assert projects("model.layers.0.mlp.up_proj.weight", w)
    assert projects("lm_head.weight", w)
    assert not projects("model.embed_tokens.weight", w)
    assert not projects("transformer.wte.weight", w)
    assert not projects("model.norm.weight", torch.zeros(3))


def test_step_fn_matches_formula(merge) -> None:
    g = torch.Generator().manual_seed(3)
    base, merged, new = (torch.randn(6, 4, generator=g) for _ in range(3))
    step = Step(index=3, prev_scale=1.4, scale=1.7)
    out = merge(
        "opcm",
        base,
        [merged, new],
        name="model.layers.0.mlp.up_proj.weight",
        params={"alpha": 0.6},
        stats={"continual_step": step},
    )
    d = (merged - base).double()
    want = base.double() + (1.4 * d + naive.rotated_projection((new - base).double(), d, 0.6)) / 1.7
    assert torch.allclose(out.double(), want, atol=1e-5)
    norm = merge(
        "opcm",
        base[0],
        [merged[0], new[0]],
        name="model.norm.weight",
        stats={"continual_step": step},
    )
    assert torch.allclose(norm, base[0] + (1.4 * (merged[0] - base[0]) + new[0] - base[0]) / 1.7)


def float32_family(root: Path, n: int) -> tuple[Path, list[Path], dict, list[dict]]:
    base = llama_tensors(0, torch.float32)
    base["lm_head.weight"] = torch.randn(16, 8, generator=torch.Generator().manual_seed(9))
    experts, tensors = [], []
    for i in range(n):
        g = torch.Generator().manual_seed(200 + i)
        t = {
            k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in base.items()
        }
        tensors.append(t)
        experts.append(write_model(root / f"e{i}", t))
    return write_model(root / "base", base), experts, base, tensors


def floats(t: dict) -> dict:
    return {k: v.double() for k, v in t.items() if v.is_floating_point()}


@pytest.mark.parametrize(("alpha", "projection"), [(0.5, True), (0.2, True), (0.5, False)])
def test_opcm_merge_matches_naive_whole_model(
    tmp_path: Path, alpha: float, projection: bool
) -> None:
    base_dir, experts, base, tensors = float32_family(tmp_path / "in", 4)
    out = tmp_path / "out"
    params = {"alpha": alpha, "projection": projection}
    recipe = parse_recipe(recipe_dict(base_dir, experts, "opcm", out, params=params))
    run_merge(recipe, MergeOptions(device="cpu"))
    want, norms, lam = naive.opcm(floats(base), [floats(t) for t in tensors], alpha, projection)
    got = load_file(str(out / "model.safetensors"))
    for k, v in want.items():
        assert torch.allclose(got[k].double(), v, atol=2e-6), k
    assert torch.equal(got["model.rotary.inv_freq_ids"], base["model.rotary.inv_freq_ids"])
    state = read_state(str(out))
    assert state.step == 4 and state.params == params
    assert state.norms == pytest.approx(norms, rel=1e-6)
    assert state.scale == pytest.approx(lam, rel=1e-5)
    assert 1.0 < state.scale < 4.0


def test_first_opcm_step_is_the_model_itself(tmp_path: Path) -> None:
    base_dir, experts, _, tensors = float32_family(tmp_path / "in", 1)
    out = tmp_path / "out"
    run_merge(parse_recipe(recipe_dict(base_dir, experts, "opcm", out)), MergeOptions())
    got = load_file(str(out / "model.safetensors"))
    for k, v in tensors[0].items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    assert read_state(str(out)).scale == 1.0
