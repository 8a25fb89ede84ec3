"""PCB-Merging (per tensor) against a hand-worked case and a loop formulation of its equations."""

from __future__ import annotations

import pytest
import torch

from amalgam.errors import RecipeError
from amalgam.methods.pcb import PCBStatistics
from amalgam.recipe import parse_recipe

from .naive import as_tensor, flat
from .naive_subspace import pcb


def test_one_model_by_hand(merge):
    # t = [3, -1, 2, 0.5], clamp 0, density 0.5, N = 1.
    # norm(|t|) = ([3, 1, 2, .5] - .5) / 2.5 = [1, .2, .6, 0]; intra = exp([1, .04, .36, 0])
    # inter = tanh(t * t) = tanh([9, 1, 4, .25]); beta = intra * inter, ascending order:
    # entry 3 (0.245), entry 1 (0.79), entry 2 (1.43), entry 0 (2.72).
    # The floor is the order statistic at floor(4 * 0.5) = 2: entry 2's beta. After clamping
    # and min-max scaling only entry 0 (strictly above the floor) has weight, 1.
    # merged = [3, 0, 0, 0] (1 * 3 / 1), plus base.
    base = torch.full((4,), 0.5)
    t = torch.tensor([3.0, -1.0, 2.0, 0.5])
    out = merge("pcb", base, [base + t], params={"density": 0.5, "clamp": 0.0})
    assert torch.equal(out, torch.tensor([3.5, 0.5, 0.5, 0.5]))


def test_two_models_share_an_entry_by_hand(merge):
    # t1 = [2, 0, 0, 1], t2 = [4, 0, 1, 0]; clamp 0, density 1 (floor = the minimum), N = 2.
    # sum = [6, 0, 1, 1]; inter1 = tanh([12, 0, 0, 1]), inter2 = tanh([24, 0, 1, 0]).
    # norm|t1| = [1, 0, 0, .5] -> intra1 = exp(2 [1, 0, 0, .25]) = [e^2, 1, 1, e^.5]
    # norm|t2| = [1, 0, .25, 0] -> intra2 = [e^2, 1, e^(1/8), 1]
    # beta1 = [e^2 tanh12, 0, 0, e^.5 tanh1]: min 0, so scaled by the max e^2 tanh 12.
    # beta2 = [e^2 tanh24, 0, e^(1/8) tanh1, 0]: scaled by e^2 tanh 24.
    # entry 0: both weights 1 -> (2 + 4) / 2 = 3; entry 2: only model 2 -> 1; entry 3: only 1 -> 1
    base = torch.zeros(4)
    out = merge(
        "pcb",
        base,
        [torch.tensor([2.0, 0.0, 0.0, 1.0]), torch.tensor([4.0, 0.0, 1.0, 0.0])],
        params={"density": 1.0, "clamp": 0.0},
    )
    torch.testing.assert_close(out, torch.tensor([3.0, 0.0, 1.0, 1.0]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(7,), (6, 7), (3, 4, 5), (64,)])
@pytest.mark.parametrize("n", [2, 4])
def test_matches_paper_equations_loop(merge, shape, n):
    g = torch.Generator().manual_seed(sum(shape) + n)
    base = torch.randn(shape, generator=g)
    inputs = [base + 0.3 * torch.randn(shape, generator=g) for _ in range(n)]
    weights = [1.0, 1.2, 0.8, 1.1][:n]
    densities = [0.1, 0.3, 0.5, 1.0][:n]
    clamp = 0.05
    out = merge(
        "pcb",
        base,
        inputs,
        params={"clamp": clamp, "lambda": 0.9},
        models=[{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)],
    )
    b = flat(base)
    deltas = [[x - y for x, y in zip(flat(m), b, strict=True)] for m in inputs]
    expected = pcb(b, deltas, weights, densities, clamp, 0.9)
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-5, atol=1e-5)


def test_defaults_keep_about_a_tenth(merge):
    # Default density 0.1: one model, 100 distinct magnitudes; entries strictly above the
    # order statistic at floor(100 * 0.9) = 90 get a weight: the 9 largest magnitudes (beta is
    # increasing in |t| here: intra and inter = tanh(t^2) both grow with |t|).
    t = torch.linspace(0.01, 1.0, 100) * torch.tensor([1.0, -1.0]).repeat(50)
    out = merge("pcb", torch.zeros(100), [t])
    kept = out != 0
    assert int(kept.sum()) == 9
    assert torch.equal(kept, t.abs() > t.abs().sort().values[90])
    # Default clamp 0.0001: the upper bound is the order statistic at floor(100 * 0.9999) - 1
    # = 98, so the largest magnitude (1.0, index 99) is clamped to 0.99 and keeps its sign.
    expected = t.clone()
    expected[99] = -0.99
    torch.testing.assert_close(out[kept], expected[kept])


def test_identical_to_base_and_scalars_give_the_base(merge):
    base = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    assert torch.equal(merge("pcb", base, [base.clone(), base.clone()]), base)
    scalar = torch.tensor(2.0)
    assert torch.equal(merge("pcb", scalar, [torch.tensor(3.0), torch.tensor(5.0)]), scalar)


def test_bf16_inputs(merge):
    g = torch.Generator().manual_seed(9)
    base = torch.randn(5, 8, generator=g).bfloat16()
    inputs = [(base.float() + 0.2 * torch.randn(5, 8, generator=g)).bfloat16() for _ in range(3)]
    out = merge("pcb", base, inputs, params={"density": 0.4, "clamp": 0.0})
    b = flat(base)
    deltas = [[x - y for x, y in zip(flat(m), b, strict=True)] for m in inputs]
    expected = pcb(b, deltas, [1.0] * 3, [0.4] * 3, 0.0, 1.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"density": 0.0}, r"params.density: must be in \(0.0, 1.0\], got 0.0"),
        ({"clamp": 0.6}, r"params.clamp: must be in \[0.0, 0.5\], got 0.6"),
        ({"clamp": [0.1, 0.2]}, None),
        ({"trim": "model"}, "params.trim: unknown parameter for 'pcb'"),
    ],
)
def test_recipe_validation(params, message):
    data = {"method": "pcb", "base": "b", "models": [{"uri": "m0"}], "params": params}
    if message is None:
        parse_recipe(data)  # a per-layer gradient of the clamp is allowed
        return
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_per_model_density_error_names_the_model():
    with pytest.raises(RecipeError, match=r"models\[1\].params.density: must be in"):
        parse_recipe(
            {
                "method": "pcb",
                "base": "b",
                "models": [{"uri": "m0"}, {"uri": "m1", "params": {"density": 1.5}}],
            }
        )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"params": {"scope": "model", "density": [0.1, 0.2]}},
            "params.density: one value for the whole recipe with scope: model",
        ),
        (
            {"params": {"scope": "model", "clamp": [0.0, 0.1]}},
            "params.clamp: one value for the whole recipe with scope: model",
        ),
        (
            {
                "params": {"scope": "model"},
                "overrides": [{"match": "mlp", "models": {"m0": {"density": 0.5}}}],
            },
            r"overrides\[0\].models.m0.density: one value for the whole recipe with scope: model",
        ),
        ({"params": {"scope": "layer"}}, "params.scope: expected one of"),
    ],
)
def test_model_scope_takes_one_value_per_model(data, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"method": "pcb", "base": "b", "models": [{"uri": "m0"}], **data})


def test_model_scope_reads_the_given_statistics(merge):
    # One model, t = [3, -1, 2, 0.5]; whole-model bounds (low 0.5, high 2.5), floor 0.1, max 1.
    # a = clamp(|t|, .5, 2.5) = [2.5, 1, 2, .5]; norm = [1, .25, .75, 0]
    # intra = exp(1 * (norm^2 - 1)) = [1, e^-.9375, e^-.4375, e^-1]; inter = tanh(t^2)
    # beta = [tanh 9, e^-.9375 tanh 1, e^-.4375 tanh 4, e^-1 tanh .25] ~ [1, .298, .646, .090]
    # weights (beta clamped at .1, minus .1, over .9): [1, .220, .606, 0] (the tensor's own
    # numbers are not used); one model, so each kept entry is sign(t) a: [2.5, -1, 2, 0]
    out = merge(
        "pcb",
        torch.zeros(4),
        [torch.tensor([3.0, -1.0, 2.0, 0.5])],
        params={"scope": "model"},
        stats={PCBStatistics.key: [(0.5, 2.5, 0.1, 1.0)]},
    )
    torch.testing.assert_close(out, torch.tensor([2.5, -1.0, 2.0, 0.0]))
