"""DELLA (MagPrune drop, rescale, TIES or linear merge) against a loop over mergekit's formula."""

from __future__ import annotations

import math

import pytest
import torch

from amalgam.errors import MergeError, RecipeError
from amalgam.methods.della import keep_probabilities

from .naive import as_tensor, disjoint_merge, flat, naive_key, naive_uniform, weighted_sum

NAME = "model.layers.0.mlp.weight"


def naive_probs(row: list[float], density: float, epsilon: float) -> list[float]:
    """Rank r (0 = smallest |v|, ties by position) of n: density - eps + 2 eps r / (n - 1)."""
    order = sorted(range(len(row)), key=lambda j: (abs(row[j]), j))
    probs = [0.0] * len(row)
    for r, j in enumerate(order):
        probs[j] = density - epsilon + 2 * epsilon * r / (len(row) - 1)
    return probs


def naive_magprune(delta: torch.Tensor, density, epsilon, rescale, model: int, seed: int):
    """One model's pruned task vector, rows along the last dimension; the uniforms are drawn
    from the documented counter-based stream (naive_uniform of the flat row-major index)."""
    rows = delta.reshape(-1, delta.shape[-1])
    key = naive_key(seed, NAME, model)
    u = [naive_uniform(key, j) for j in range(rows.numel())]
    values, probs = flat(rows), []
    for r in range(rows.shape[0]):
        probs += naive_probs(values[r * rows.shape[1] : (r + 1) * rows.shape[1]], density, epsilon)
    kept = [v if uj < p else 0.0 for v, uj, p in zip(values, u, probs, strict=True)]
    if rescale == "l1":
        before, after = sum(abs(v) for v in values), sum(abs(v) for v in kept)
        ratio = before / after if before >= 1e-7 and after >= 1e-7 else 1.0
        return [v * ratio for v in kept]
    if rescale == "exact":
        return [v / p for v, p in zip(kept, probs, strict=True)]
    return kept


def experts(seed: int = 0, shape=(6, 10), n: int = 3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) for _ in range(n)]


def test_keep_probabilities_by_rank_loop():
    g = torch.Generator().manual_seed(1)
    mags = torch.randn(4, 9, generator=g).abs()
    mags[0, 3] = mags[0, 5]  # a tie: the earlier position ranks lower
    got = keep_probabilities(mags, 0.5, 0.2)
    want = [p for r in range(4) for p in naive_probs(flat(mags[r]), 0.5, 0.2)]
    torch.testing.assert_close(got.double(), as_tensor(want, got), rtol=1e-6, atol=1e-7)
    assert got.min() == pytest.approx(0.3) and got.max() == pytest.approx(0.7)


@pytest.mark.parametrize("rescale", ["l1", "exact", "none"])
@pytest.mark.parametrize(("method", "normalize"), [("della", True), ("della_linear", False)])
def test_merge_matches_loop(merge, method, normalize, rescale):
    base, inputs = experts()
    weights, dens, eps = [0.7, 1.0, 0.4], [0.5, 0.4, 0.6], [0.2, 0.1, 0.15]
    models = [
        {"weight": w, "density": d, "epsilon": e}
        for w, d, e in zip(weights, dens, eps, strict=True)
    ]
    params = {"rescale": rescale, "lambda": 0.8}
    out = merge(method, base, inputs, params=params, models=models, name=NAME, seed=5)
    pruned = [
        naive_magprune(x - base, d, e, rescale, i, 5)
        for i, (x, d, e) in enumerate(zip(inputs, dens, eps, strict=True))
    ]
    if method == "della":
        mixed = disjoint_merge(pruned, weights, "sum", normalize)
    else:
        mixed = weighted_sum(pruned, weights, normalize)
    want = [b + 0.8 * m for b, m in zip(flat(base), mixed, strict=True)]
    torch.testing.assert_close(out.double(), as_tensor(want, out), rtol=1e-5, atol=1e-5)


def test_keep_rate_follows_rank(merge):
    # one row of 20000 entries: the lowest-ranked tenth is kept about 20% of the time, the
    # highest about 40% (density 0.3, epsilon 0.1); 3 sigma is under 0.015
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(20000, generator=g)
    out = merge("della_linear", torch.zeros(20000), [delta], params={"rescale": "none"}, name=NAME)
    kept = (out != 0).double()[delta.abs().argsort()]
    assert float(kept[:2000].mean()) == pytest.approx(0.21, abs=0.015)
    assert float(kept[-2000:].mean()) == pytest.approx(0.39, abs=0.015)
    assert float(kept.mean()) == pytest.approx(0.3, abs=0.01)


def test_exact_rescale_is_unbiased_on_average(merge):
    # E[m_j / p_j] = 1: averaged over seeds the pruned task vector approaches the task vector.
    # Entry j's mean over S seeds has sd |d_j| sqrt((1 - p_j) / (p_j S)); allow 4.5 sd each
    # (64 entries: a false alarm about once in 2,500 streams).
    delta, seeds = torch.linspace(-2, 2, 64), 300
    outs = [
        merge("della_linear", torch.zeros(64), [delta], name=NAME, seed=s) for s in range(seeds)
    ]
    mean = torch.stack(outs).mean(0)
    probs = torch.tensor(naive_probs(flat(delta), 0.3, 0.1))
    sd = delta.abs() * ((1 - probs) / (probs * seeds)).sqrt()
    assert bool(((mean - delta).abs() <= 4.5 * sd).all())
    assert math.isclose(float(mean.sum()), float(delta.sum()), abs_tol=2.0)


def test_density_one_is_plain_ties_and_task_arithmetic(merge):
    base, inputs = experts(3)
    models = [{"weight": w, "density": 1.0} for w in (0.5, 1.0, 0.3)]
    della = merge("della", base, inputs, models=models)
    ties = merge("ties", base, inputs, models=models)
    assert torch.equal(della, ties)
    linear = merge("della_linear", base, inputs, models=models)
    ta = merge("task_arithmetic", base, inputs, models=[{"weight": w} for w in (0.5, 1.0, 0.3)])
    assert torch.equal(linear, ta)


def test_seeded_masks(merge):
    base, inputs = experts(4)
    a = merge("della", base, inputs, name=NAME, seed=1)
    assert torch.equal(a, merge("della", base, inputs, name=NAME, seed=1))
    assert not torch.equal(a, merge("della", base, inputs, name=NAME, seed=2))


def test_density_epsilon_outside_unit_interval_refused(merge):
    base, inputs = experts()
    with pytest.raises(RecipeError, match=r"models\[0\]\.params: density 0.9 \+/- epsilon 0.15"):
        merge("della", base, inputs, models=[{"density": 0.9, "epsilon": 0.15}, {}, {}])
    # a per-tensor override the recipe check cannot see fails at merge, naming the tensor
    overrides = [{"match": "mlp", "params": {"density": 0.05}}]
    with pytest.raises(MergeError, match=rf"{NAME}: model 0: density 0.05"):
        merge("della_linear", base, inputs, name=NAME, overrides=overrides)


def test_unknown_parameter_named(merge):
    base, inputs = experts()
    with pytest.raises(RecipeError, match=r"params\.gamma: unknown parameter for 'della'"):
        merge("della", base, inputs, params={"gamma": 0.1})
