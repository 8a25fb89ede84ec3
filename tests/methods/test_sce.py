"""SCE (select by variance, calculate weights, erase signs) against a loop over mergekit's rule."""

from __future__ import annotations

import pytest
import torch

from amalgam.errors import RecipeError

from .naive import as_tensor, flat, sign


def naive_sce(base: list[float], xs: list[list[float]], select_topk: float) -> list[float]:
    """mergekit 0.1.5's sce, one position at a time (distinct variances assumed)."""
    n, size = len(xs), len(base)
    deltas = [[x[j] - base[j] for j in range(size)] for x in xs]
    if select_topk < 1:
        var = []
        for j in range(size):
            mean = sum(d[j] for d in deltas) / n
            var.append(sum((d[j] - mean) ** 2 for d in deltas) / n)
        k = int(sum(1 for v in var if v != 0) * select_topk)
        top = set(sorted(range(size), key=lambda j: -var[j])[:k])
        deltas = [[d[j] if j in top else 0.0 for j in range(size)] for d in deltas]
    c = [sum(v * v for v in d) / size for d in deltas]
    weights = [1.0 / n] * n if abs(sum(c)) < 1e-6 else [ci / sum(c) for ci in c]
    out = []
    for j in range(size):
        elected = 1 if sum(d[j] for d in deltas) >= 0 else -1
        num = sum(w * d[j] for w, d in zip(weights, deltas, strict=True) if sign(d[j]) == elected)
        den = sum(w for w, d in zip(weights, deltas, strict=True) if sign(d[j]) == elected)
        out.append(base[j] + num / max(den, 1e-6))
    return out


def test_hand_worked_two_models(merge):
    # deltas a = [1, -2, 0, 3], b = [-1, 1, 2, 1] (base 0), no selection.
    # c_a = (1 + 4 + 0 + 9) / 4 = 3.5, c_b = (1 + 1 + 4 + 1) / 4 = 1.75: w = [2/3, 1/3].
    # sums [0, -1, 2, 4] elect [+, -, +, +]: position 0 keeps a (1), 1 keeps a (-2),
    # 2 keeps b (2), 3 averages (2/3 * 3 + 1/3 * 1) / 1 = 7/3.
    a, b = torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([-1.0, 1.0, 2.0, 1.0])
    out = merge("sce", torch.zeros(4), [a, b], params={"select_topk": 1.0})
    torch.testing.assert_close(out, torch.tensor([1.0, -2.0, 2.0, 7 / 3]))


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("shape", [(7,), (5, 12)])
def test_matches_loop(merge, select_topk, shape):
    g = torch.Generator().manual_seed(len(shape))
    base = torch.randn(shape, generator=g)
    xs = [base + torch.randn(shape, generator=g) for _ in range(3)]
    xs[1] = xs[1].clone()
    xs[1].reshape(-1)[:2] = base.reshape(-1)[:2]  # some zero task-vector entries
    out = merge("sce", base, xs, params={"select_topk": select_topk})
    want = naive_sce(flat(base), [flat(x) for x in xs], select_topk)
    torch.testing.assert_close(out.double(), as_tensor(want, out), rtol=1e-5, atol=1e-6)


def test_nothing_selected_and_identical_models_give_the_base(merge):
    base = torch.randn(3, 4)
    same = [base + 1.0, base + 1.0]  # variance 0 everywhere: no position is selected
    torch.testing.assert_close(merge("sce", base, same, params={"select_topk": 0.5}), base)
    # without selection, identical task vectors merge to themselves
    torch.testing.assert_close(merge("sce", base, same, params={"select_topk": 1.0}), base + 1)


def test_bad_input_named(merge):
    base = torch.zeros(4)
    with pytest.raises(RecipeError, match=r"params\.select_topk: must be in \(0.0, 1.0\]"):
        merge("sce", base, [base, base], params={"select_topk": 0.0})
    with pytest.raises(RecipeError, match=r"models\[0\]\.params\.weight: unknown parameter"):
        merge("sce", base, [base, base], models=[{"weight": 1.0}, {}])
