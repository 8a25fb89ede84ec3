"""Fisher-weighted averaging: hand-worked cases, normalisation, floors, errors, recipe checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from amalgam.errors import MergeError, RecipeError
from amalgam.recipe import parse_recipe
from tests.methods.data_driven import run


def test_hand_worked_without_normalisation() -> None:
    w1, w2 = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, 6.0, 5.0])
    f1, f2 = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 0.0, 2.0])
    out = run("fisher", [w1, w2], [f1, f2], {"normalize": False, "epsilon": 0.0})
    # (1*1 + 3*3)/4 = 2.5; no Fisher anywhere: plain mean 4; equal Fishers: mean 2.
    torch.testing.assert_close(out, torch.tensor([2.5, 4.0, 2.0]))


def test_weights_and_epsilon_floor() -> None:
    w1, w2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    f1, f2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])
    out = run("fisher", [w1, w2], [f1, f2], {"normalize": False, "epsilon": 0.5}, [1.0, 3.0])
    # entry 0: (1*1.5*1 + 3*1.5*3) / (1.5 + 4.5) = 2.5; entry 1: only the floor: (2 + 18) / 4
    torch.testing.assert_close(out, torch.tensor([2.5, 5.0]))


def test_normalisation_divides_by_whole_model_norms() -> None:
    w1, w2 = torch.tensor([0.0]), torch.tensor([1.0])
    f1, f2 = torch.tensor([2.0]), torch.tensor([2.0])
    # c_i proportional to 1/||F_i||: c = (1/1, 1/4) -> merged = (0.25 * 2 * 1) / (2 + 0.5) = 0.2
    out = run("fisher", [w1, w2], [f1, f2], {"epsilon": 0.0}, norms=[1.0, 4.0])
    torch.testing.assert_close(out, torch.tensor([0.2]))
    same = run("fisher", [w1, w2], [f1, f2], {"epsilon": 0.0, "normalize": False})
    torch.testing.assert_close(same, torch.tensor([0.5]))


def test_against_elementwise_loop() -> None:
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(4, 5, generator=g) for _ in range(3)]
    fs = [torch.rand(4, 5, generator=g) for _ in range(3)]
    norms, weights = [2.0, 0.5, 1.0], [1.0, 2.0, 0.5]
    out = run("fisher", ws, fs, {"epsilon": 1e-3}, weights, norms)
    inv = [1 / n for n in norms]
    c = [w * v / sum(inv) for w, v in zip(weights, inv, strict=True)]
    for r in range(4):
        for k in range(5):
            num = sum(c[i] * (float(fs[i][r, k]) + 1e-3) * float(ws[i][r, k]) for i in range(3))
            den = sum(c[i] * (float(fs[i][r, k]) + 1e-3) for i in range(3))
            assert float(out[r, k]) == pytest.approx(num / den, rel=1e-5)


def test_errors() -> None:
    x = [torch.ones(2), torch.zeros(2)]
    with pytest.raises(MergeError, match="lacks it"):
        run("fisher", x, [torch.ones(2), None])
    with pytest.raises(MergeError, match="zero everywhere"):
        run("fisher", x, [torch.ones(2), torch.ones(2)], norms=[1.0, 0.0])


def recipe(method: str, **changes: Any) -> dict:
    data = {
        "method": method,
        "models": [{"uri": "a", "data": "a.jsonl"}, {"uri": "b", "data": "b.jsonl"}],
    }
    data.update(changes)
    return data


NO_DATA = [{"uri": "a"}]
STRAY_DATA = [{"uri": "a", "data": "x"}]
PER_MODEL_SAMPLES = [{"uri": "a", "data": "x", "params": {"samples": 3}}]
SAMPLES_OVERRIDE = [{"match": "x", "params": {"samples": 4}}]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (recipe("fisher", models=NO_DATA), r"models\[0\]: method 'fisher' needs statistics"),
        (recipe("linear", models=STRAY_DATA), r"models\[0\]\.data: method 'linear' reads no"),
        (recipe("fisher", params={"samples": 2.5}), "params.samples: expected an integer"),
        (recipe("fisher", params={"samples": 0}), "params.samples: must be in"),
        (recipe("fisher", params={"fisher": "mean"}), "params.fisher: expected one of"),
        (recipe("fisher", params={"draws": 0}), "params.draws: must be in"),
        (recipe("fisher", params={"epsilon": -1}), "params.epsilon: must be in"),
        (
            recipe("fisher", overrides=SAMPLES_OVERRIDE),
            r"overrides\[0\]\.params\.samples: one value for the whole recipe",
        ),
        (recipe("regmean", params={"alpha": 1.5}), "params.alpha: must be in"),
        (recipe("regmean", models=PER_MODEL_SAMPLES), "a shared parameter"),
    ],
)
def test_recipe_checks(data: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)
