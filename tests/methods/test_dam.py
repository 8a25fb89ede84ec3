"""DAM's mask and merge math against naive element-wise computations."""

from __future__ import annotations

import math

import pytest
import torch

from amalgam.errors import RecipeError
from amalgam.methods.base import MergeContext, get_method
from amalgam.methods.params import resolve_params
from amalgam.recipe import parse_recipe
from amalgam.statistics.dam_masks import concrete_sample, final_masks, mean_one


def test_concrete_sample_is_the_relaxed_bernoulli_formula() -> None:
    logits = torch.tensor([[-2.0, 0.0, 1.5], [3.0, -0.5, 0.25]])
    got = concrete_sample(logits, 0.5, torch.Generator().manual_seed(7))
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(7)).tolist()
    for i in range(2):
        for j in range(3):
            uij = min(max(u[i][j], 1e-6), 1 - 1e-6)
            x = (math.log(uij) - math.log(1 - uij) + float(logits[i, j])) / 0.5
            assert float(got[i, j]) == pytest.approx(1 / (1 + math.exp(-x)), rel=1e-5)


def test_final_masks_drop_entries_whose_logits_fell_below_minus_drop() -> None:
    shared = torch.tensor([0.0, 2.0, -2.5, 0.5, -1.9])
    detection = [torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0]), torch.tensor([-3.0, 1.0, 0.0, -2.0, 0.0])]
    got = final_masks(shared, detection, 2.0)
    for d, mask in zip(detection, got, strict=True):
        want = [
            float(a >= -2.0 and b >= -2.0) for a, b in zip(shared.tolist(), d.tolist(), strict=True)
        ]
        assert mask.tolist() == want
    assert got[1].tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]


def test_mean_one_rescales_to_mean_one() -> None:
    assert mean_one(torch.tensor([1.0, 3.0])).tolist() == [0.5, 1.5]


def test_merge_is_base_plus_masked_task_vectors() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=g)
    inputs = [torch.randn(3, 4, generator=g) for _ in range(2)]
    masks = [torch.rand(3, 4, generator=g) for _ in range(2)]
    recipe = parse_recipe(
        {
            "method": "dam",
            "base": "b",
            "models": [
                {"uri": "m0", "data": "d0", "params": {"weight": 0.5}},
                {"uri": "m1", "data": "d1"},
            ],
            "params": {"lambda": 0.7},
        }
    )
    method = get_method("dam")
    ctx = MergeContext(name="w", model_stats=tuple(masks))
    got = method.fn(base, inputs, resolve_params(recipe, method, "w", 1), ctx)
    weights = [0.5, 1.0]
    for r in range(3):
        for c in range(4):
            want = float(base[r, c]) + 0.7 * sum(
                w * float(m[r, c]) * (float(x[r, c]) - float(base[r, c]))
                for w, m, x in zip(weights, masks, inputs, strict=True)
            )
            assert float(got[r, c]) == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("model", "field"),
    [({"uri": "m0"}, r"models\[0\]\.data"), ({"uri": "m0", "statistics": "s"}, "statistics")],
)
def test_dam_without_data_names_the_field(model: dict, field: str) -> None:
    with pytest.raises(RecipeError, match=field):
        parse_recipe({"method": "dam", "base": "b", "models": [model]})


def test_learning_parameters_take_one_value() -> None:
    with pytest.raises(RecipeError, match=r"params\.steps"):
        parse_recipe(
            {
                "method": "dam",
                "base": "b",
                "models": [{"uri": "m0", "data": "d"}],
                "params": {"steps": [1, 2]},
            }
        )
