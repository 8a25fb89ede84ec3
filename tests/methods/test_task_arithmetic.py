"""Task arithmetic: W0 + lambda * sum_i w_i (W_i - W0), by hand and by an element loop."""

from __future__ import annotations

import pytest
import torch

from .naive import as_tensor, flat, weighted_sum

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
M1 = torch.tensor([2.0, 0.0, 1.0, 1.5])  # delta1 = [1, -1, 0, 0.5]
M2 = torch.tensor([1.0, 3.0, -1.0, 1.0])  # delta2 = [0, 2, -2, 0]


def test_defaults_sum_task_vectors_by_hand(merge):
    # lambda 1, weights 1, no normalize: 1 + [1, -1, 0, 0.5] + [0, 2, -2, 0] = [2, 2, -1, 1.5]
    out = merge("task_arithmetic", BASE, [M1, M2])
    assert torch.equal(out, torch.tensor([2.0, 2.0, -1.0, 1.5]))


def test_weights_and_lambda_by_hand(merge):
    # weights [1, 2], lambda 0.5: d1 + 2 d2 = [1, 3, -4, 0.5]; 1 + 0.5 * that = [1.5, 2.5, -1, 1.25]
    out = merge(
        "task_arithmetic",
        BASE,
        [M1, M2],
        params={"lambda": 0.5},
        models=[{"weight": 1.0}, {"weight": 2.0}],
    )
    assert torch.equal(out, torch.tensor([1.5, 2.5, -1.0, 1.25]))


def test_normalize_by_hand(merge):
    # weights [1, 3], normalize: (d1 + 3 d2) / 4 = [1, 5, -6, 0.5] / 4 = [0.25, 1.25, -1.5, 0.125]
    out = merge(
        "task_arithmetic",
        BASE,
        [M1, M2],
        params={"normalize": True},
        models=[{"weight": 1.0}, {"weight": 3.0}],
    )
    assert torch.equal(out, torch.tensor([1.25, 2.25, -0.5, 1.125]))


def test_negative_weight_subtracts_a_task(merge):
    # weights [1, -1]: 1 + d1 - d2 = 1 + [1, -3, 2, 0.5] = [2, -2, 3, 1.5]
    out = merge("task_arithmetic", BASE, [M1, M2], models=[{"weight": 1.0}, {"weight": -1.0}])
    assert torch.equal(out, torch.tensor([2.0, -2.0, 3.0, 1.5]))


def test_normalize_zero_weight_sum_divides_by_one(merge):
    # weights [1, -1] sum to 0: the divisor is replaced by 1 (mergekit), so the result is the
    # plain signed sum: [2, -2, 3, 1.5] as above, with no inf or NaN.
    out = merge(
        "task_arithmetic",
        BASE,
        [M1, M2],
        params={"normalize": True},
        models=[{"weight": 1.0}, {"weight": -1.0}],
    )
    assert torch.equal(out, torch.tensor([2.0, -2.0, 3.0, 1.5]))


def test_normalize_divisor_threshold_is_1e_8(merge):
    # weight sum 1e-9 (< 1e-8): divisor 1, result 1 + 1e-9 * d1 (rounds to the base in float32).
    tiny = merge(
        "task_arithmetic",
        BASE,
        [M1, M2],
        params={"normalize": True},
        models=[{"weight": 1e-9}, {"weight": 0.0}],
    )
    assert torch.isfinite(tiny).all()
    torch.testing.assert_close(tiny, BASE + 1e-9 * (M1 - BASE))
    # weight sum 2e-8 (> 1e-8): the divisor is kept, so the lone weighted model is recovered.
    small = merge(
        "task_arithmetic",
        BASE,
        [M1, M2],
        params={"normalize": True},
        models=[{"weight": 2e-8}, {"weight": 0.0}],
    )
    torch.testing.assert_close(small, M1)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(), (9,), (4, 6), (2, 2, 3)])
def test_matches_loop_formulation(merge, normalize, shape):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=g)
    inputs = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(3)]
    weights, lam = [0.5, -0.25, 1.5], 0.7
    out = merge(
        "task_arithmetic",
        base,
        inputs,
        params={"lambda": lam, "normalize": normalize},
        models=[{"weight": w} for w in weights],
    )
    b = flat(base)
    deltas = [[x - y for x, y in zip(flat(m), b, strict=True)] for m in inputs]
    mixed = weighted_sum(deltas, weights, normalize)
    expected = [y + lam * v for y, v in zip(b, mixed, strict=True)]
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-5, atol=1e-6)


def test_all_zero_task_vectors_give_the_base(merge):
    base = torch.tensor([[0.5, -1.0], [2.0, 3.0]])
    out = merge("task_arithmetic", base, [base.clone(), base.clone()], params={"lambda": 3.0})
    assert torch.equal(out, base)


def test_single_model_is_base_plus_scaled_delta(merge):
    # 1 + 0.5 * ([2, 0, 1, 1.5] - 1) = [1.5, 0.5, 1, 1.25]
    out = merge("task_arithmetic", BASE, [M1], params={"lambda": 0.5})
    assert torch.equal(out, torch.tensor([1.5, 0.5, 1.0, 1.25]))
    # lambda 1 and one model gives the model back exactly (dyadic values).
    assert torch.equal(merge("task_arithmetic", BASE, [M1]), M1)
