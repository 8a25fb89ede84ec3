"""Model Stock: ratio from pairwise cosines (loops), identical, orthogonal and opposed offsets."""

from __future__ import annotations

import math

import pytest
import torch

from amalgam.errors import RecipeError
from amalgam.recipe import parse_recipe

from .naive import as_tensor, flat, stock_ratio


def test_sixty_degrees_by_hand(merge):
    # base [1, 1]; offsets d1 = [2, 0], d2 = [1, r3]: norms 2 and 2, dot 2 -> cos 0.5.
    # t = k cos / (1 + (k - 1) cos) = 2 * 0.5 / 1.5 = 2/3.
    # average of the models: ([3, 1] + [2, 1 + r3]) / 2 = [2.5, 1 + r3/2]
    # result: 2/3 * [2.5, 1 + r3/2] + 1/3 * [1, 1] = [2, 1 + r3/3]
    r3 = math.sqrt(3)
    base = torch.tensor([1.0, 1.0])
    out = merge(
        "model_stock", base, [base + torch.tensor([2.0, 0.0]), base + torch.tensor([1.0, r3])]
    )
    torch.testing.assert_close(out, torch.tensor([2.0, 1 + r3 / 3]))


def test_identical_offsets_give_the_plain_average(merge):
    # cos 1 -> t = k / k = 1 -> the average of the models (here all equal to the model).
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    model = base + torch.randn(4, 6, generator=g)
    out = merge("model_stock", base, [model, model.clone(), model.clone()])
    torch.testing.assert_close(out, model)


def test_orthogonal_offsets_give_the_base(merge):
    # cos 0 -> t = 0 -> the base.
    base = torch.tensor([0.5, -0.5, 2.0])
    out = merge(
        "model_stock",
        base,
        [base + torch.tensor([1.0, 0.0, 0.0]), base + torch.tensor([0.0, 0.0, 5.0])],
    )
    assert torch.equal(out, base)


def test_negative_cosine_is_clamped_to_the_base(merge):
    # k = 2 at 120 degrees: cos -0.5, t = 2 * -0.5 / (1 - 0.5) = -2, clamped to 0 -> the base.
    base = torch.zeros(2)
    d1 = torch.tensor([1.0, 0.0])
    d2 = torch.tensor([-0.5, math.sqrt(3) / 2])
    assert torch.equal(merge("model_stock", base, [d1, d2]), base)
    # opposite offsets: cos -1, denominator 1 + (k - 1)(-1) = 0 -> t = 0 -> the base
    assert torch.equal(merge("model_stock", base, [d1, -d1]), base)


def test_three_offsets_summing_to_zero_give_the_base(merge):
    # Three unit vectors 120 degrees apart: every pairwise cos is -1/2, the mean is -1/(k - 1),
    # the lowest possible, and the denominator 1 + 2 * (-1/2) = 0 -> t = 0.
    base = torch.ones(2)
    offsets = [
        torch.tensor([math.cos(a), math.sin(a)]) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)
    ]
    out = merge("model_stock", base, [base + d for d in offsets])
    torch.testing.assert_close(out, base)


def test_zero_offset_counts_as_cosine_zero(merge):
    # d1 = d2 = [1, 0], d3 = 0: cosines (1, 0, 0) -> mean 1/3 -> t = 3 (1/3) / (1 + 2/3) = 0.6
    # average offset: [2/3, 0]; result base + 0.6 * [2/3, 0] = base + [0.4, 0]
    base = torch.zeros(2)
    d = torch.tensor([1.0, 0.0])
    out = merge("model_stock", base, [d, d.clone(), base.clone()])
    torch.testing.assert_close(out, torch.tensor([0.4, 0.0]))


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("shape", [(), (9,), (5, 7), (3, 2, 4)])
def test_matches_pairwise_cosine_loops(merge, k, shape):
    g = torch.Generator().manual_seed(k * 10 + len(shape))
    base = torch.randn(shape, generator=g)
    shared = torch.randn(shape, generator=g)  # correlated offsets: cos well inside (0, 1)
    inputs = [base + shared + 0.7 * torch.randn(shape, generator=g) for _ in range(k)]
    out = merge("model_stock", base, inputs)
    b = flat(base)
    deltas = [[x - y for x, y in zip(flat(m), b, strict=True)] for m in inputs]
    t = stock_ratio(deltas)
    avg = [sum(flat(m)[j] for m in inputs) / k for j in range(len(b))]
    expected = [t * v + (1 - t) * y for v, y in zip(avg, b, strict=True)]
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-5, atol=1e-5)


def test_filter_wise_uses_one_ratio_per_row(merge):
    g = torch.Generator().manual_seed(8)
    base = torch.randn(4, 6, generator=g)
    inputs = [base + torch.randn(4, 6, generator=g) for _ in range(3)]
    # Row 2: identical offsets in every model -> t = 1 for that row alone.
    for m in inputs[1:]:
        m[2] = inputs[0][2]
    out = merge("model_stock", base, inputs, params={"filter_wise": True})
    for r in range(4):
        b = flat(base[r])
        deltas = [[x - y for x, y in zip(flat(m[r]), b, strict=True)] for m in inputs]
        t = stock_ratio(deltas)
        avg = [sum(flat(m[r])[j] for m in inputs) / 3 for j in range(len(b))]
        expected = [t * v + (1 - t) * y for v, y in zip(avg, b, strict=True)]
        torch.testing.assert_close(
            out[r].double(), as_tensor(expected, out[r]), rtol=1e-5, atol=1e-5
        )
    torch.testing.assert_close(out[2], inputs[0][2])
    # 1-D tensors are a single row either way
    v_base, v_in = base[0], [m[0] for m in inputs]
    torch.testing.assert_close(
        merge("model_stock", v_base, v_in, params={"filter_wise": True}),
        merge("model_stock", v_base, v_in),
    )


def test_needs_two_models_and_a_base():
    with pytest.raises(RecipeError, match="at least 2"):
        parse_recipe({"method": "model_stock", "base": "b", "models": [{"uri": "m"}]})
    with pytest.raises(RecipeError, match="needs a base"):
        parse_recipe({"method": "model_stock", "models": [{"uri": "m1"}, {"uri": "m2"}]})
