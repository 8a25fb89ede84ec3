"""Multi-SLERP against a second formulation: the normalised weighted mean direction of the
models (or task vectors), times their weighted mean norm (mergekit's tangent sum is zero)."""

from __future__ import annotations

import math

import pytest
import torch

from amalgam.errors import MergeError, RecipeError

from .naive import as_tensor, flat


def naive_multislerp(xs: list[list[float]], weights: list[float], normalize: bool) -> list[float]:
    w = [v / sum(weights) for v in weights] if normalize else list(weights)
    norms = [math.sqrt(sum(v * v for v in x)) for x in xs]
    units = [[v / (n + 1e-8) for v in x] for x, n in zip(xs, norms, strict=True)]
    mean = [sum(wi * u[j] for wi, u in zip(w, units, strict=True)) for j in range(len(xs[0]))]
    length = math.sqrt(sum(v * v for v in mean))
    scale = sum(wi * n for wi, n in zip(w, norms, strict=True))
    return [v / length * scale for v in mean]


def test_hand_worked_quarter_turn(merge):
    # e1 (norm 2) and e2 (norm 4), equal weights: direction (e1 + e2)/r2, norm (2 + 4)/2 = 3
    out = merge(
        "multislerp",
        None,
        [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])],
        models=[{"weight": 1.0}, {"weight": 1.0}],
    )
    torch.testing.assert_close(out, torch.tensor([3 / math.sqrt(2), 3 / math.sqrt(2)]))


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_mean_direction(merge, with_base, normalize):
    g = torch.Generator().manual_seed(int(with_base) + 2 * int(normalize))
    base = torch.randn(5, 7, generator=g)
    xs = [base + torch.randn(5, 7, generator=g) for _ in range(4)]
    weights = [0.1, 0.4, 0.2, 0.3]
    out = merge(
        "multislerp",
        base if with_base else None,
        xs,
        params={"normalize_weights": normalize},
        models=[{"weight": w} for w in weights],
    )
    vecs = [flat(x - base) if with_base else flat(x) for x in xs]
    want = as_tensor(naive_multislerp(vecs, weights, normalize), out)
    if with_base:
        want = want + base.double()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_one_model_is_returned_unchanged(merge):
    x = torch.randn(3, 4)
    torch.testing.assert_close(merge("multislerp", torch.zeros(3, 4), [x]), x)


def test_antipodal_pair_falls_back_to_linear_and_three_are_refused(merge):
    a = torch.tensor([1.0, 2.0, 3.0])
    out = merge("multislerp", None, [a, -a], models=[{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(out, torch.zeros(3))  # 0.5 a + 0.5 (-a)
    with pytest.raises(MergeError, match="w: the weighted mean direction of the 3 models"):
        merge("multislerp", None, [a, -a, a], models=[{"weight": 1}, {"weight": 2}, {"weight": 1}])


def test_a_tensor_no_model_changed_gives_the_base(merge):
    # every task vector zero (a LoRA expert's untouched lm_head): the base, not an error
    base = torch.randn(3, 4)
    models = [{"weight": 1.0}] * 3
    torch.testing.assert_close(merge("multislerp", base, [base] * 3, models=models), base)


def test_bad_input_named(merge):
    xs = [torch.randn(3) for _ in range(2)]
    with pytest.raises(MergeError, match="weights sum to 0"):
        merge("multislerp", None, xs, models=[{"weight": 1.0}, {"weight": -1.0}])
    with pytest.raises(RecipeError, match=r"params\.eps: must be in"):
        merge("multislerp", None, xs, params={"eps": -1.0})
