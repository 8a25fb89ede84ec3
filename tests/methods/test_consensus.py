"""Consensus merging with TALL masks against a hand-worked case and per-entry vote loops."""

from __future__ import annotations

import pytest
import torch

from amalgam.errors import RecipeError
from amalgam.methods.whole_model import MagnitudeThreshold
from amalgam.recipe import parse_recipe

from .naive import as_tensor, disjoint_merge, flat, trim, weighted_sum
from .naive_subspace import consensus

# Three task vectors over four entries (base 0):
T1 = torch.tensor([1.0, 2.0, 0.0, -1.0])
T2 = torch.tensor([1.0, -2.0, 0.0, 0.5])
T3 = torch.tensor([1.0, 1.0, 3.0, 0.25])
# tau = T1 + T2 + T3 = [3, 1, 3, -0.25]. TALL masks at lambda 0.6: |t_i| > 0.6 |tau - t_i|
# entry 0: |1| > 0.6 * 2 = 1.2?  no, no, no                      -> count 0 (catastrophic)
# entry 1: 2 > 0.6 * 1 yes; 2 > 0.6 * 3 = 1.8 yes; 1 > 0.6 * 0 yes -> count 3
# entry 2: 0 > 0 no; 0 > 0 no; 3 > 0.6 * 0 yes                     -> count 1 (selfish)
# entry 3: 1 > 0.6 * .75 yes; .5 > 0.6 * .75 = .45 yes; .25 > 0.6 * .5 = .3 no -> count 2


@pytest.mark.parametrize(
    ("agreement", "kept"),
    [(2, [0, 1, 0, 1]), (1, [0, 1, 1, 1]), (0, [1, 1, 1, 1]), (3, [0, 1, 0, 0]), (4, [0, 0, 0, 0])],
)
def test_four_entries_by_hand(merge, agreement, kept):
    tau = torch.tensor([3.0, 1.0, 3.0, -0.25])
    out = merge(
        "consensus_ta",
        torch.zeros(4),
        [T1, T2, T3],
        params={"agreement": agreement, "lambda": 0.5},
    )
    assert torch.equal(out, 0.5 * tau * torch.tensor(kept, dtype=torch.float32))


def test_agreement_zero_is_task_arithmetic(merge):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=g)
    inputs = [base + torch.randn(5, 6, generator=g) for _ in range(3)]
    params = {"lambda": 0.4}
    ta = merge("task_arithmetic", base, inputs, params=params)
    out = merge("consensus_ta", base, inputs, params={**params, "agreement": 0})
    torch.testing.assert_close(out, ta)


def test_per_model_mask_lambda_by_hand(merge):
    # Entry 3 above with model 3's lambda lowered to 0.4: .25 > 0.4 * .5 = .2 -> count 3;
    # at agreement 3, entries 1 and 3 survive.
    out = merge(
        "consensus_ta",
        torch.zeros(4),
        [T1, T2, T3],
        params={"agreement": 3},
        models=[{}, {}, {"mask_lambda": 0.4}],
    )
    assert torch.equal(out, torch.tensor([0.0, 1.0, 0.0, -0.25]))


def dyadic(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(-8, 9, shape, generator=g).float() / 4


@pytest.mark.parametrize("shape", [(17,), (6, 7), (2, 3, 5)])
def test_consensus_ta_matches_vote_loop(merge, shape):
    g = torch.Generator().manual_seed(sum(shape))
    base = dyadic(shape, g)
    inputs = [base + dyadic(shape, g) for _ in range(4)]
    weights, lambdas = [1.0, 0.5, 2.0, 1.5], [0.2, 0.4, 0.6, 0.5]
    out = merge(
        "consensus_ta",
        base,
        inputs,
        params={"lambda": 0.75},
        models=[{"weight": w, "mask_lambda": m} for w, m in zip(weights, lambdas, strict=True)],
    )
    b = flat(base)
    deltas = [[x - y for x, y in zip(flat(m), b, strict=True)] for m in inputs]
    masked = consensus(deltas, weighted_sum(deltas, weights, False), lambdas, 2)
    expected = [y + 0.75 * v for y, v in zip(b, masked, strict=True)]
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape", [(17,), (6, 7)])
def test_consensus_ties_matches_vote_loop(merge, shape, normalize):
    # Masks compare the raw task vectors with the TIES vector built from the trimmed ones.
    g = torch.Generator().manual_seed(sum(shape) + normalize)
    base = dyadic(shape, g)
    inputs = [base + dyadic(shape, g) for _ in range(4)]
    densities = [0.3, 0.5, 0.2, 1.0]
    out = merge(
        "consensus_ties",
        base,
        inputs,
        params={"lambda": 1.25, "normalize": normalize, "agreement": 1},
        models=[{"density": d} for d in densities],
    )
    b = flat(base)
    deltas = [[x - y for x, y in zip(flat(m), b, strict=True)] for m in inputs]
    trimmed = [trim(d, r) for d, r in zip(deltas, densities, strict=True)]
    tau = disjoint_merge(trimmed, [1.0] * 4, "sum", normalize)
    masked = consensus(deltas, tau, [0.6] * 4, 1)
    expected = [y + 1.25 * v for y, v in zip(b, masked, strict=True)]
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-6, atol=1e-6)


def test_consensus_ties_model_trim_reads_thresholds(merge):
    # Whole-model thresholds 1.5 and 0.5: trimmed t1 = [2, 0, -1.5], t2 = [-1, 0.5, 0]
    # (TIES, sum): votes [1, .5, -1.5] -> [+, +, -]; sums [2, .5, -1.5].
    # masks (lambda .6): t1: 2 > .6*0, 1 > .6*.5, 1.5 > .6*0 -> [y, y, y];
    # t2: 1 > .6*3 no, .5 > .6*0 yes, 0 > .6*1.5 no -> [n, y, n]. agreement 2: entry 1 only.
    out = merge(
        "consensus_ties",
        torch.zeros(3),
        [torch.tensor([2.0, 1.0, -1.5]), torch.tensor([-1.0, 0.5, 0.0])],
        params={"trim": "model"},
        stats={MagnitudeThreshold.key: [1.5, 0.5]},
    )
    assert torch.equal(out, torch.tensor([0.0, 0.5, 0.0]))


@pytest.mark.parametrize(
    ("method", "data", "message"),
    [
        ("consensus_ta", {"params": {"agreement": 1.5}}, "params.agreement: must be a whole"),
        ("consensus_ta", {"params": {"agreement": -1}}, r"params.agreement: must be in \[0"),
        ("consensus_ta", {"params": {"agreement": [1, 2]}}, "a list value is not allowed"),
        (
            "consensus_ta",
            {"overrides": [{"match": "mlp", "params": {"agreement": 2.5}}]},
            r"overrides\[0\].params.agreement: must be a whole",
        ),
        (
            "consensus_ta",
            {"models": [{"uri": "m0", "params": {"mask_lambda": -0.1}}]},
            r"models\[0\].params.mask_lambda: must be in \[0.0, inf\)",
        ),
        ("consensus_ta", {"params": {"agreement": True}}, "params.agreement: expected a number"),
        ("consensus_ta", {"params": {"density": 0.2}}, "unknown parameter for 'consensus_ta'"),
        (
            "consensus_ties",
            {"params": {"trim": "model", "density": [0.1, 0.2]}},
            "params.density: one value for the whole recipe with trim: model, not a gradient",
        ),
        ("consensus_ties", {"params": {"consensus": "max"}}, "params.consensus: expected one of"),
    ],
)
def test_recipe_errors_name_the_field(method, data, message):
    recipe = {"method": method, "base": "b", "models": [{"uri": "m0"}], **data}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe)
