"""NuSLERP: t from two weights, whole-tensor or per-vector slerp, task vectors over a base."""

from __future__ import annotations

import math

import pytest
import torch

from amalgam.errors import RecipeError

from .naive import as_tensor, flat


def naive_slerp(t: float, a: list[float], b: list[float]) -> list[float]:
    """Shoemake's formula on the raw vectors, angle from their normalised dot product; lerp
    where 1 - cos^2 <= 1e-16 (mergekit's nuslerp rule)."""
    na = max(math.sqrt(sum(x * x for x in a)), 1e-7)
    nb = max(math.sqrt(sum(x * x for x in b)), 1e-7)
    cos = max(-1.0, min(1.0, sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)))
    if 1 - cos * cos <= 1e-16:
        return [(1 - t) * x + t * y for x, y in zip(a, b, strict=True)]
    theta = math.acos(cos)
    ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return [ca * x + cb * y for x, y in zip(a, b, strict=True)]


def naive_nuslerp(t, a: torch.Tensor, b: torch.Tensor, flatten: bool, row_wise: bool):
    """Slerp of the whole tensors, of each row (last dim), or of each column (first dim)."""
    if flatten:
        return as_tensor(naive_slerp(t, flat(a), flat(b)), a)
    if row_wise:
        return naive_nuslerp(t, a.T, b.T, False, False).T
    out = [naive_slerp(t, flat(ra), flat(rb)) for ra, rb in zip(a, b, strict=True)]
    return as_tensor([v for row in out for v in row], a)


def test_quarter_turn_by_hand(merge):
    # weights 1 and 2: t = 2/3; e1 -> e2 is a quarter turn, so the result is
    # [cos(pi/3), sin(pi/3)] = [1/2, r3/2]
    out = merge(
        "nuslerp",
        None,
        [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])],
        models=[{"weight": 1.0}, {"weight": 2.0}],
    )
    torch.testing.assert_close(out, torch.tensor([0.5, math.sqrt(3) / 2]))


@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_matches_loop(merge, flatten, row_wise, with_base):
    g = torch.Generator().manual_seed(int(flatten) + 2 * int(row_wise))
    base = torch.randn(4, 6, generator=g)
    a, b = base + torch.randn(4, 6, generator=g), base + torch.randn(4, 6, generator=g)
    weights = [{"weight": 0.3}, {"weight": 0.9}]
    params = {"flatten": flatten, "row_wise": row_wise}
    out = merge("nuslerp", base if with_base else None, [a, b], params=params, models=weights)
    t = 0.9 / 1.2
    if with_base:
        want = base.double() + naive_nuslerp(t, a - base, b - base, flatten, row_wise)
    else:
        want = naive_nuslerp(t, a, b, flatten, row_wise)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_exactly_parallel_and_antiparallel_interpolate_linearly(merge):
    a = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 4.0, 0.0], [-3.0, 0.0, 0.0]])  # rows parallel, antiparallel
    models = [{"weight": 3.0}, {"weight": 1.0}]  # t = 1/4
    out = merge("nuslerp", None, [a, b], params={"flatten": False}, models=models)
    torch.testing.assert_close(out, 0.75 * a + 0.25 * b)


def test_weights_summing_to_zero_take_the_midpoint(merge):
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = merge("nuslerp", None, [a, b], models=[{"weight": 1.0}, {"weight": -1.0}])
    torch.testing.assert_close(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


@pytest.mark.parametrize(("n", "message"), [(1, "needs at least 2"), (3, "takes at most 2")])
def test_wrong_model_count_named(merge, n, message):
    xs = [torch.randn(3) for _ in range(n)]
    with pytest.raises(RecipeError, match=rf"models: 'nuslerp' {message} models"):
        merge("nuslerp", None, xs)


def test_unknown_parameter_named(merge):
    xs = [torch.randn(3) for _ in range(2)]
    with pytest.raises(RecipeError, match=r"params\.t: unknown parameter for 'nuslerp'"):
        merge("nuslerp", None, xs, params={"t": 0.5})
