"""TIES-Merging (per-tensor trim, sign election, disjoint mean) against hand cases and loops."""

from __future__ import annotations

import pytest
import torch

from amalgam.errors import RecipeError
from amalgam.methods.whole_model import MagnitudeThreshold
from amalgam.recipe import parse_recipe

from .naive import as_tensor, disjoint_merge, flat, trim

BASE = torch.ones(5)
# Task vectors (model - base):
D1 = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0])
D2 = torch.tensor([-2.0, 2.0, -0.5, 1.0, -1.0])
D3 = torch.tensor([1.0, -3.0, 4.0, -2.0, 0.2])


def test_three_models_by_hand(merge):
    # density 0.6 of n = 5 -> keep floor(3.0) = 3 per model.
    # trim d1: |.| = [3, 1, .5, 2, 4], top 3 = {4, 3, 2}        -> [ 3,  0, 0,  2, -4]
    # trim d2: |.| = [2, 2, .5, 1, 1], 3rd largest = 1, and both 1s tie with it, so both are
    #          kept (kept-ties rule): 4 entries survive         -> [-2,  2, 0,  1, -1]
    # trim d3: |.| = [1, 3, 4, 2, .2], top 3 = {4, 3, 2}        -> [ 0, -3, 4, -2,  0]
    # votes (sum): [1, -1, 4, 1, -5] -> signs [+, -, +, +, -]
    # agreeing:    col0 {3}, col1 {-3}, col2 {4}, col3 {2, 1}, col4 {-4, -1}
    # disjoint mean: [3, -3, 4, 1.5, -2.5]; plus base 1 -> [4, -2, 5, 2.5, -1.5]
    out = merge("ties", BASE, [BASE + D1, BASE + D2, BASE + D3], params={"density": 0.6})
    assert torch.equal(out, torch.tensor([4.0, -2.0, 5.0, 2.5, -1.5]))


def test_no_normalize_sums_agreeing_entries_by_hand(merge):
    # Same trim and election as above; sums instead of means: [3, -3, 4, 3, -5] + 1
    out = merge(
        "ties",
        BASE,
        [BASE + D1, BASE + D2, BASE + D3],
        params={"density": 0.6, "normalize": False, "lambda": 0.5},
    )
    # lambda 0.5: 1 + 0.5 * [3, -3, 4, 3, -5] = [2.5, -0.5, 3, 2.5, -1.5]
    assert torch.equal(out, torch.tensor([2.5, -0.5, 3.0, 2.5, -1.5]))


def test_zero_vote_elects_plus(merge):
    # density 1 (no trim). Column votes: 1 + (-1) = 0 and -2 + 2 = 0, both elect +1.
    # col0: only d1 = 1 agrees -> 1/1 = 1; col1: only d2 = 2 agrees -> 2/1 = 2.
    base = torch.zeros(2)
    d1, d2 = torch.tensor([1.0, -2.0]), torch.tensor([-1.0, 2.0])
    out = merge("ties", base, [d1, d2], params={"density": 1.0})
    assert torch.equal(out, torch.tensor([1.0, 2.0]))


def test_all_zero_task_vectors_give_the_base(merge):
    # Every vote is 0 (elects +1), nothing agrees (exact zeros never count), divisor 0 -> 1.
    base = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    out = merge("ties", base, [base.clone(), base.clone(), base.clone()])
    assert torch.equal(out, base)


def test_count_consensus_by_hand(merge):
    # weighted deltas [5], [-1], [-1]: the mass vote is 3 (elects +), the count vote is
    # 1 - 2 = -1 (elects -). sum: 5/1 = 5; count: (-1 - 1)/2 = -1.
    base = torch.zeros(1)
    inputs = [torch.tensor([5.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    by_sum = merge("ties", base, inputs, params={"density": 1.0})
    by_count = merge("ties", base, inputs, params={"density": 1.0, "consensus": "count"})
    assert torch.equal(by_sum, torch.tensor([5.0]))
    assert torch.equal(by_count, torch.tensor([-1.0]))


def test_weights_enter_vote_and_divisor_by_hand(merge):
    # weights [1, 3], density 1: weighted deltas [2, -1] and [-3, 3]
    # votes [-1, 2] -> [-, +]; col0: only -3 (weight 3) agrees -> -3/3 = -1
    # col1: only 3 (weight 3) agrees -> 3/3 = 1
    base = torch.zeros(2)
    out = merge(
        "ties",
        base,
        [torch.tensor([2.0, -1.0]), torch.tensor([-1.0, 1.0])],
        params={"density": 1.0},
        models=[{"weight": 1.0}, {"weight": 3.0}],
    )
    assert torch.equal(out, torch.tensor([-1.0, 1.0]))


def test_negative_weight_flips_the_vote(merge):
    # weights [1, -2], density 1: weighted [1] and [-2 * 1] = [-2]; vote -1 elects -;
    # only the second (weighted -2, weight -2) agrees: -2 / -2 = 1.
    base = torch.zeros(1)
    out = merge(
        "ties",
        base,
        [torch.tensor([1.0]), torch.tensor([1.0])],
        params={"density": 1.0},
        models=[{"weight": 1.0}, {"weight": -2.0}],
    )
    assert torch.equal(out, torch.tensor([1.0]))


def test_agreeing_weights_summing_to_zero_divide_by_one(merge):
    # weights [1, -1], deltas [1] and [-1]: weighted [1] and [1], vote 2 elects +, both agree;
    # divisor 1 + (-1) = 0 < 1e-8 -> 1, so the merge is 0.5 + (1 + 1) / 1 = 2.5 (no inf/NaN).
    out = merge(
        "ties",
        torch.tensor([0.5]),
        [torch.tensor([1.5]), torch.tensor([-0.5])],
        params={"density": 1.0},
        models=[{"weight": 1.0}, {"weight": -1.0}],
    )
    assert torch.equal(out, torch.tensor([2.5]))


def test_tiny_tensor_keeps_at_least_one_entry(merge):
    # n = 3, density 0.2: floor(0.6) = 0, but keep_count keeps 1 (the largest magnitude).
    # Single model, so the merge is base + trimmed delta: [0, -5, 0].
    base = torch.zeros(3)
    out = merge("ties", base, [torch.tensor([1.0, -5.0, 2.0])], params={"density": 0.2})
    assert torch.equal(out, torch.tensor([0.0, -5.0, 0.0]))


def test_scalar_tensor_is_kept(merge):
    # A 0-d tensor has one entry; keep_count keeps it at any density.
    out = merge("ties", torch.tensor(1.0), [torch.tensor(3.0)], params={"density": 0.01})
    assert torch.equal(out, torch.tensor(3.0))


def test_density_one_single_model_is_the_model(merge):
    g = torch.Generator().manual_seed(2)
    base, model = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    out = merge("ties", base, [model], params={"density": 1.0})
    torch.testing.assert_close(out, model)


def dyadic(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random multiples of 1/4 in [-2, 2]: sums are exact in float32, and magnitudes tie often."""
    return torch.randint(-8, 9, shape, generator=g).float() / 4


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(), (1,), (17,), (6, 7), (2, 3, 5)])
def test_matches_per_element_vote_loop(merge, shape, normalize, consensus):
    g = torch.Generator().manual_seed(sum(shape) + 3 * normalize + len(consensus))
    base = dyadic(shape, g)
    inputs = [base + dyadic(shape, g) for _ in range(4)]
    weights = [1.0, 0.5, 2.0, 1.5]
    densities = [0.3, 0.5, 0.1, 1.0]
    out = merge(
        "ties",
        base,
        inputs,
        params={"normalize": normalize, "consensus": consensus, "lambda": 1.25},
        models=[{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)],
    )
    b = flat(base)
    deltas = [
        trim([x - y for x, y in zip(flat(m), b, strict=True)], d)
        for m, d in zip(inputs, densities, strict=True)
    ]
    mixed = disjoint_merge(deltas, weights, consensus, normalize)
    expected = [y + 1.25 * v for y, v in zip(b, mixed, strict=True)]
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-6, atol=1e-6)


def test_default_density_is_one_fifth(merge):
    # Defaults: density 0.2, lambda 1, normalize. One model with distinct magnitudes 1..20:
    # the top floor(0.2 * 20) = 4 survive (17, 18, 19, 20), the rest are zeroed.
    delta = torch.arange(1.0, 21.0) * torch.tensor([1.0, -1.0]).repeat(10)
    out = merge("ties", torch.zeros(20), [delta])
    expected = torch.where(delta.abs() > 16, delta, torch.zeros(20))
    assert torch.equal(out, expected)


def test_model_trim_uses_the_given_thresholds(merge):
    # With trim: model the per-tensor top-k is replaced by each model's whole-model threshold
    # from ctx.stats; here 2.5 for model 0 and 0.75 for model 1 (density is not used).
    base = torch.zeros(4)
    d1, d2 = torch.tensor([3.0, 1.0, -2.5, 0.5]), torch.tensor([0.5, -1.0, 0.75, 2.0])
    out = merge(
        "ties",
        base,
        [d1, d2],
        params={"trim": "model", "density": 0.01},
        stats={MagnitudeThreshold.key: [2.5, 0.75]},
    )
    # trimmed: [3, 0, -2.5, 0] and [0, -1, 0.75, 2]; votes [3, -1, -1.75, 2] -> [+, -, -, +]
    # col0: 3/1; col1: -1/1; col2: -2.5/1 (0.75 disagrees); col3: 2/1
    assert torch.equal(out, torch.tensor([3.0, -1.0, -2.5, 2.0]))


@pytest.mark.parametrize(
    "changes",
    [
        {"overrides": [{"match": "mlp", "params": {"density": 0.5}}]},
        {"overrides": [{"match": "mlp", "models": {"m0": {"density": 0.5}}}]},
        {"params": {"trim": "model", "density": [0.1, 0.5]}},
    ],
)
def test_model_trim_rejects_per_tensor_density(changes):
    data = {
        "method": "ties",
        "base": "base",
        "models": [{"uri": "m0"}, {"uri": "m1"}],
        "params": {"trim": "model"},
        **changes,
    }
    with pytest.raises(RecipeError, match="density"):
        parse_recipe(data)
