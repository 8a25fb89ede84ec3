"""TSV-M, PCB and Consensus merges through run_merge on a small Llama-named model, checked
against the naive whole-model formulations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from amalgam.engine import MergeOptions, run_merge
from amalgam.recipe import load_recipe, parse_recipe
from tests.helpers import family, recipe_dict

from .naive import flat, weighted_sum
from .naive_subspace import consensus, pcb, tsv_model


def load(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def run(tmp_path: Path, method: str, params: dict, n: int = 3):
    base_dir, experts = family(tmp_path / "in", n=n)
    out = tmp_path / "out"
    recipe = parse_recipe(
        recipe_dict(base_dir, experts, method, out, params=params, dtype="float32")
    )
    run_merge(recipe, MergeOptions(device="cpu"))
    base = load(base_dir)
    floats = sorted(k for k, v in base.items() if v.is_floating_point())
    return base, [load(e) for e in experts], load(out), floats


def test_tsv_m_matches_numpy_whole_model(tmp_path):
    base, models, out, floats = run(tmp_path, "tsv_m", {"lambda": 0.8})
    as_np = {k: base[k].double().numpy() for k in floats}
    expected = tsv_model(
        as_np, [{k: m[k].double().numpy() for k in floats} for m in models], [1.0] * 3, 0.8
    )
    assert any(base[k].dim() == 2 for k in floats) and any(base[k].dim() == 1 for k in floats)
    for k in floats:
        assert out[k].dtype == torch.float32
        np.testing.assert_allclose(out[k].double().numpy(), expected[k], atol=1e-5, err_msg=k)
    assert torch.equal(out["model.rotary.inv_freq_ids"], base["model.rotary.inv_freq_ids"])


def test_pcb_matches_loop_per_tensor(tmp_path):
    base, models, out, floats = run(tmp_path, "pcb", {"density": 0.2, "lambda": 1.1})
    for k in floats:
        b = flat(base[k])
        deltas = [[x - y for x, y in zip(flat(m[k]), b, strict=True)] for m in models]
        expected = pcb(b, deltas, [1.0] * 3, [0.2] * 3, 0.0001, 1.1)
        torch.testing.assert_close(
            out[k].double(),
            torch.tensor(expected, dtype=torch.float64).reshape(base[k].shape),
            rtol=1e-5,
            atol=1e-5,
        )


def test_consensus_ta_matches_vote_loop(tmp_path):
    base, models, out, floats = run(tmp_path, "consensus_ta", {"lambda": 0.5}, n=4)
    dropped = 0
    for k in floats:
        b = flat(base[k])
        deltas = [[x - y for x, y in zip(flat(m[k]), b, strict=True)] for m in models]
        masked = consensus(deltas, weighted_sum(deltas, [1.0] * 4, False), [0.6] * 4, 2)
        dropped += sum(v == 0 for v in masked)
        expected = [y + 0.5 * v for y, v in zip(b, masked, strict=True)]
        torch.testing.assert_close(
            out[k].double(),
            torch.tensor(expected, dtype=torch.float64).reshape(base[k].shape),
            rtol=1e-6,
            atol=1e-6,
        )
    assert dropped > 0  # the consensus mask removed entries


def test_pcb_model_scope_is_the_whole_model_computation(tmp_path):
    # scope: model: the outlier clamp, the weight floor and the min-max span each model's
    # whole task vector; the naive computation runs on one concatenated vector.
    params = {"density": 0.2, "clamp": 0.01, "lambda": 1.1, "scope": "model"}
    base, models, out, floats = run(tmp_path, "pcb", params)
    b = [v for k in floats for v in flat(base[k])]
    model_flat = [[v for k in floats for v in flat(m[k])] for m in models]
    deltas = [[x - y for x, y in zip(m, b, strict=True)] for m in model_flat]
    expected = pcb(b, deltas, [1.0] * 3, [0.2] * 3, 0.01, 1.1)
    at = 0
    for k in floats:
        size = base[k].numel()
        want = torch.tensor(expected[at : at + size], dtype=torch.float64)
        torch.testing.assert_close(out[k].double().reshape(-1), want, rtol=1e-5, atol=1e-5, msg=k)
        at += size
    # the per-tensor variant is another model
    per_tensor = run(tmp_path / "t", "pcb", {**params, "scope": "tensor"})[2]
    assert any(not torch.equal(per_tensor[k], out[k]) for k in floats)


@pytest.mark.parametrize(
    ("config", "method"),
    [("tsv_m.yaml", "tsv_m"), ("pcb.yaml", "pcb"), ("consensus_ta.yaml", "consensus_ta")],
)
def test_example_configs_are_valid_recipes(monkeypatch, config, method):
    monkeypatch.setenv("ZOO", "/zoo")
    recipe = load_recipe(Path(__file__).parents[2] / "configs" / config)
    assert recipe.method == method
    assert recipe.base == "/zoo/base" and len(recipe.models) == 8
