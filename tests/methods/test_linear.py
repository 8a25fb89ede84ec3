"""Linear (weighted average / uniform soup): hand-worked cases and a loop-based average."""

from __future__ import annotations

import pytest
import torch

from .naive import as_tensor, flat, weighted_sum


def test_uniform_soup_by_hand(merge):
    # Defaults: weight 1 each, normalize true -> plain mean.
    # ([1, 2, 3] + [3, 6, 9]) / 2 = [2, 4, 6]
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([3.0, 6.0, 9.0])
    out = merge("linear", None, [a, b])
    assert torch.equal(out, torch.tensor([2.0, 4.0, 6.0]))


def test_weighted_average_by_hand(merge):
    # weights 1 and 3: (1*[1, 2, 3] + 3*[3, 6, 9]) / 4 = [10, 20, 30] / 4 = [2.5, 5, 7.5]
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([3.0, 6.0, 9.0])
    out = merge("linear", None, [a, b], models=[{"weight": 1.0}, {"weight": 3.0}])
    assert torch.equal(out, torch.tensor([2.5, 5.0, 7.5]))


def test_unnormalized_is_weighted_sum_by_hand(merge):
    # normalize false: 0.5*[2, -4] + 2*[1, 1] = [1, -2] + [2, 2] = [3, 0]
    a = torch.tensor([2.0, -4.0])
    b = torch.tensor([1.0, 1.0])
    out = merge(
        "linear",
        None,
        [a, b],
        params={"normalize": False},
        models=[{"weight": 0.5}, {"weight": 2.0}],
    )
    assert torch.equal(out, torch.tensor([3.0, 0.0]))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 4)])
def test_matches_loop_formulation(merge, normalize, shape):
    g = torch.Generator().manual_seed(11)
    inputs = [torch.randn(shape, generator=g) for _ in range(3)]
    weights = [0.25, 1.5, 0.75]
    out = merge(
        "linear",
        None,
        inputs,
        params={"normalize": normalize},
        models=[{"weight": w} for w in weights],
    )
    expected = weighted_sum([flat(x) for x in inputs], weights, normalize)
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-6, atol=1e-6)
    assert out.shape == torch.Size(shape)
    assert out.dtype == torch.float32


def test_single_model_is_identity(merge):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(merge("linear", None, [x]), x)
    # A lone model with any positive weight is still itself once normalized.
    torch.testing.assert_close(merge("linear", None, [x], models=[{"weight": 0.3}]), x)


def test_base_is_ignored(merge):
    a, b = torch.tensor([1.0, 5.0]), torch.tensor([3.0, 1.0])
    with_base = merge("linear", torch.tensor([100.0, -100.0]), [a, b])
    assert torch.equal(with_base, torch.tensor([2.0, 3.0]))


def test_zero_weight_drops_a_model(merge):
    # weights [0, 2]: (0*a + 2*b) / 2 = b
    a, b = torch.tensor([9.0, 9.0]), torch.tensor([1.0, -2.0])
    out = merge("linear", None, [a, b], models=[{"weight": 0.0}, {"weight": 2.0}])
    assert torch.equal(out, b)


def test_all_zero_weights_fall_back_to_plain_mean(merge):
    a, b = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])
    out = merge("linear", None, [a, b], models=[{"weight": 0.0}, {"weight": 0.0}])
    assert torch.equal(out, torch.tensor([2.0, 4.0]))
