"""Karcher mean: a hand-worked case, a loop over mergekit's iteration, and the fixed point
(the weighted log-map of the inputs at the mean vanishes)."""

from __future__ import annotations

import math

import pytest
import torch

from amalgam.errors import RecipeError

from .naive import as_tensor, flat


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def naive_karcher(xs: list[list[float]], max_iter: int, tol: float) -> list[float]:
    """mergekit's karcher_merge_tensors, in Python floats."""
    alphas = [1 / len(xs)] * len(xs)
    norms = [math.sqrt(dot(x, x)) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return [0.0] * len(xs[0])
    a = [alphas[i] / sum(alphas[i] for i in valid) for i in valid]
    us = [[v / norms[i] for v in xs[i]] for i in valid]
    mean = [sum(ai * u[j] for ai, u in zip(a, us, strict=True)) for j in range(len(xs[0]))]
    length = math.sqrt(dot(mean, mean))
    mean = list(us[0]) if length < tol else [v / length for v in mean]
    for _ in range(max_iter):
        step = [0.0] * len(mean)
        for ai, u in zip(a, us, strict=True):
            c = max(-1.0, min(1.0, dot(mean, u)))
            theta = math.acos(c)
            if theta < tol:
                continue
            f = ai * theta / math.sin(theta)
            step = [s + f * (uj - c * m) for s, uj, m in zip(step, u, mean, strict=True)]
        sn = math.sqrt(dot(step, step))
        if sn < tol:
            break
        mean = [math.cos(sn) * m + math.sin(sn) * s / sn for m, s in zip(mean, step, strict=True)]
        mn = math.sqrt(dot(mean, mean))
        mean = [m / mn for m in mean] if mn > tol else mean
    scale = sum(al * n for al, n in zip(alphas, norms, strict=True))
    return [scale * m for m in mean]


def test_two_orthogonal_vectors_by_hand(merge):
    # the Karcher mean of e1 and e2 is their bisector; mean norm (1 + 3) / 2 = 2
    out = merge("karcher", None, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])])
    torch.testing.assert_close(out, torch.tensor([math.sqrt(2), math.sqrt(2)]))


@pytest.mark.parametrize("max_iter", [0, 1, 3, 10])
def test_matches_loop(merge, max_iter):
    g = torch.Generator().manual_seed(max_iter)
    xs = [torch.randn(4, 5, generator=g) + 0.5 for _ in range(4)]
    out = merge("karcher", None, xs, params={"max_iter": max_iter})
    want = naive_karcher([flat(x) for x in xs], max_iter, 1e-5)
    torch.testing.assert_close(out.double(), as_tensor(want, out), rtol=1e-5, atol=1e-6)


def test_converged_mean_is_a_fixed_point(merge):
    # at the Karcher mean u, sum_i theta_i / sin(theta_i) (u_i - cos_i u) = 0
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(12, generator=g) + 1.0 for _ in range(3)]
    out = merge("karcher", None, xs, params={"max_iter": 100, "tol": 1e-9})
    u = out.double() / out.double().norm()
    grad = torch.zeros_like(u)
    for x in xs:
        ui = x.double() / x.double().norm()
        c = float(u @ ui)
        theta = math.acos(max(-1.0, min(1.0, c)))
        grad += theta / math.sin(theta) * (ui - c * u)
    assert float(grad.norm()) < 1e-5
    assert float(out.norm()) == pytest.approx(sum(float(x.norm()) for x in xs) / 3, rel=1e-5)


def test_zero_input_counts_in_the_norm_not_the_direction(merge):
    a = torch.tensor([2.0, 0.0])
    out = merge("karcher", None, [a, torch.zeros(2)])
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0]))  # direction e1, norm (2 + 0)/2


def test_base_is_not_used(merge):
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    torch.testing.assert_close(merge("karcher", torch.ones(2) * 9, xs), merge("karcher", None, xs))


def test_bad_input_named(merge):
    xs = [torch.randn(3) for _ in range(2)]
    with pytest.raises(RecipeError, match=r"params\.max_iter: expected an integer"):
        merge("karcher", None, xs, params={"max_iter": 2.5})
    with pytest.raises(RecipeError, match=r"models\[0\]\.params\.weight: unknown parameter"):
        merge("karcher", None, xs, models=[{"weight": 1.0}, {}])
