"""Model Breadcrumbs (outlier band, then sum or TIES) against hand cases and an argsort band."""

from __future__ import annotations

import pytest
import torch

from .naive import as_tensor, band, disjoint_merge, flat, weighted_sum

DELTA = torch.tensor([0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 0.8, -0.4, 0.6, 1.0])


def test_band_then_sum_by_hand(merge):
    # Model 1: gamma 0.1 drops floor(1.0) = 1 outlier (1.0); density 0.3 keeps 0.9, 0.8, 0.7.
    # Model 2 (delta = -DELTA / 2, same ranking): keeps -(-0.45), -0.4, 0.35 at the same places.
    # Sum at those places: idx1 -0.9 + 0.45, idx4 -0.7 + 0.35, idx6 0.8 - 0.4.
    base = torch.full((10,), 2.0)
    out = merge(
        "breadcrumbs",
        base,
        [base + DELTA, base - DELTA / 2],
        params={"density": 0.3, "gamma": 0.1},
    )
    expected = base.clone()
    expected[1] += -0.9 + 0.45
    expected[4] += -0.7 + 0.35
    expected[6] += 0.8 - 0.4
    torch.testing.assert_close(out, expected)


def test_row_granularity_by_hand(merge):
    # Row-wise, d = 4: gamma 0.25 drops the largest of each row, density 0.5 keeps the next 2.
    delta = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.4, 0.3, 0.2, 0.1]])
    base = torch.zeros(2, 4)
    rows = merge(
        "breadcrumbs",
        base,
        [delta],
        params={"density": 0.5, "gamma": 0.25, "granularity": "row"},
    )
    assert torch.equal(rows, torch.tensor([[0.0, 3.0, 2.0, 0.0], [0.0, 0.3, 0.2, 0.0]]))
    # Tensor-wise (default), n = 8: drop 4 and 3, keep 2, 1, 0.4, 0.3.
    whole = merge("breadcrumbs", base, [delta], params={"density": 0.5, "gamma": 0.25})
    assert torch.equal(whole, torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.4, 0.3, 0.0, 0.0]]))


def test_no_outlier_slot_keeps_the_band(merge):
    # Default gamma 0.006 on n = 10: floor(0.06) = 0 outliers. mergekit would zero the whole
    # delta (empty slice [n_bot : -0]); here the top max(1, floor(0.15 * 10)) = 1 entry stays.
    base = torch.zeros(10)
    out = merge("breadcrumbs", base, [DELTA])
    expected = torch.zeros(10)
    expected[9] = 1.0
    assert torch.equal(out, expected)


def test_defaults_on_a_larger_tensor(merge):
    # Defaults: density 0.15, gamma 0.006, lambda 1. n = 1000 distinct magnitudes 1..1000:
    # drop the top floor(6.0) = 6 (995..1000), keep the next 150 (845..994).
    mags = torch.arange(1.0, 1001.0)
    delta = mags[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    out = merge("breadcrumbs", torch.zeros(1000), [delta])
    expected = torch.where((delta >= 845) & (delta <= 994), delta, torch.zeros(1000))
    assert torch.equal(out, expected)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("shape", [(50,), (6, 30), (2, 3, 25)])
def test_matches_argsort_band_and_loops(merge, shape, granularity):
    g = torch.Generator().manual_seed(shape[-1] + len(granularity))
    base = torch.randn(shape, generator=g)
    inputs = [base + torch.randn(shape, generator=g) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    densities = [0.2, 0.4, 0.1]
    gammas = [0.05, 0.0, 0.1]
    out = merge(
        "breadcrumbs",
        base,
        inputs,
        params={"granularity": granularity, "lambda": 0.8},
        models=[
            {"weight": w, "density": d, "gamma": y}
            for w, d, y in zip(weights, densities, gammas, strict=True)
        ],
    )
    b = flat(base)
    width = shape[-1] if granularity == "row" else len(b)
    deltas = []
    for m, d, y in zip(inputs, densities, gammas, strict=True):
        full = [x - z for x, z in zip(flat(m), b, strict=True)]
        deltas.append(
            [v for r in range(0, len(full), width) for v in band(full[r : r + width], d, y)]
        )
    mixed = weighted_sum(deltas, weights, normalize=False)
    expected = [z + 0.8 * v for z, v in zip(b, mixed, strict=True)]
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-5, atol=1e-6)


def test_breadcrumbs_ties_matches_band_then_disjoint_mean(merge):
    g = torch.Generator().manual_seed(9)
    base = torch.randn(8, 16, generator=g)
    inputs = [base + torch.randn(8, 16, generator=g) for _ in range(3)]
    out = merge("breadcrumbs_ties", base, inputs, params={"density": 0.3, "gamma": 0.05})
    b = flat(base)
    deltas = [band([x - z for x, z in zip(flat(m), b, strict=True)], 0.3, 0.05) for m in inputs]
    mixed = disjoint_merge(deltas, [1.0, 1.0, 1.0], "sum", normalize=True)
    expected = [z + v for z, v in zip(b, mixed, strict=True)]
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-5, atol=1e-6)


def test_all_zero_task_vectors_give_the_base(merge):
    base = torch.randn(4, 5, generator=torch.Generator().manual_seed(4))
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        out = merge(method, base, [base.clone(), base.clone()])
        assert torch.equal(out, base)


def test_gamma_one_removes_everything(merge):
    base = torch.zeros(6)
    out = merge("breadcrumbs", base, [torch.arange(1.0, 7.0)], params={"gamma": 1.0})
    assert torch.equal(out, base)


def test_quantized_deltas_keep_the_band(merge):
    # A LayerNorm gain at 1.0 in bf16 fine-tuned by a little: 40 of 4096 entries move by one
    # bf16 step above 1.0 (+2^-7) or by 2^-7 below it, the rest not at all, so every nonzero
    # delta has magnitude 2^-7. gamma 0.006 asks for floor(24.6) = 24 outliers, so at least
    # 40 - 24 = 16 of the moved entries must survive (the references remove exactly 24; a
    # kept-ties rule would remove none). Today all 40 tie with the outlier threshold and go.
    base = torch.ones(4096, dtype=torch.bfloat16)
    model = base.clone()
    model[torch.arange(0, 4000, 200)] = torch.tensor(1 + 2**-7, dtype=torch.bfloat16)
    model[torch.arange(100, 4000, 200)] = torch.tensor(1 - 2**-7, dtype=torch.bfloat16)
    assert int((model != base).sum()) == 40
    out = merge("breadcrumbs", base.float(), [model.float()])
    assert int((out != 1.0).sum()) >= 40 - 24
