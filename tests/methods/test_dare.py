"""DARE (random drop and rescale, linear and TIES variants): rescale rules, seeding, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from amalgam.methods.base import MergeContext
from amalgam.methods.counter_random import lanes

from .naive import as_tensor, disjoint_merge, flat


def dare(merge, inputs, base=None, name="model.layers.0.mlp.weight", seed=0, **params):
    base = torch.zeros_like(inputs[0]) if base is None else base
    return merge("dare_linear", base, inputs, params=params, name=name, seed=seed)


def ramp(n: int) -> torch.Tensor:
    """A task vector with no zero entry: kept entries are exactly the nonzero outputs."""
    return torch.linspace(0.5, 1.5, n) * torch.tensor([1.0, -1.0]).repeat(n // 2)


def test_exact_rescale_divides_by_keep_probability(merge):
    # density 0.25 (p = 0.75): every survivor is delta / 0.25 = 4 * delta, the rest 0.
    delta = ramp(64)
    out = dare(merge, [delta], density=0.25)
    kept = out != 0
    assert 0 < int(kept.sum()) < 64
    assert torch.equal(out, torch.where(kept, delta * 4, torch.zeros(64)))


def test_l1_rescale_matches_the_norm_by_loop(merge):
    # mergekit's rule: survivors x ||delta||_1 / ||kept delta||_1
    delta = ramp(64)
    out = dare(merge, [delta], density=0.25, rescale="l1")
    kept = (out != 0).tolist()
    values = flat(delta)
    ratio = sum(abs(v) for v in values) / sum(
        abs(v) for v, k in zip(values, kept, strict=True) if k
    )
    expected = [v * ratio if k else 0.0 for v, k in zip(values, kept, strict=True)]
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-6, atol=0)
    assert math.isclose(float(out.abs().sum()), sum(abs(v) for v in values), rel_tol=1e-6)


def test_no_rescale_only_drops(merge):
    delta = ramp(64)
    out = dare(merge, [delta], density=0.25, rescale="none")
    assert torch.equal(out, torch.where(out != 0, delta, torch.zeros(64)))


def test_rescale_rules_share_one_mask(merge):
    delta = ramp(256)
    masks = [dare(merge, [delta], density=0.4, rescale=r) != 0 for r in ("exact", "l1", "none")]
    assert torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0], masks[2])


def test_density_one_is_identity(merge):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 7, generator=g)
    inputs = [base + torch.randn(5, 7, generator=g) for _ in range(2)]
    for rescale in ("exact", "l1", "none"):
        out = dare(merge, inputs, base=base, density=1.0, rescale=rescale)
        ta = merge("task_arithmetic", base, inputs)
        assert torch.equal(out, ta)


def test_same_seed_name_and_index_give_the_same_mask(merge):
    delta = ramp(512)
    first = dare(merge, [delta], density=0.5, seed=7, name="a.weight")
    again = dare(merge, [delta], density=0.5, seed=7, name="a.weight")
    assert torch.equal(first, again)
    # The mask is the documented counter-based stream of (seed, name, model index 0)
    key = MergeContext(name="a.weight", seed=7).random_key(0)
    assert torch.equal(first != 0, lanes(key, 0, 512) < round(0.5 * 2**31))


def test_tensor_name_seed_and_model_index_change_the_mask(merge):
    delta = ramp(512)
    ref = dare(merge, [delta], density=0.5, seed=7, name="a.weight") != 0
    other_name = dare(merge, [delta], density=0.5, seed=7, name="b.weight") != 0
    other_seed = dare(merge, [delta], density=0.5, seed=8, name="a.weight") != 0
    assert not torch.equal(ref, other_name)
    assert not torch.equal(ref, other_seed)
    # Two identical models get different masks (index 0 and 1): with rescale none their
    # sum is 2 * delta where both kept, delta where one kept, 0 where none.
    two = dare(merge, [delta, delta], density=0.5, seed=7, name="a.weight", rescale="none")
    ratio = (two / delta).round()
    assert set(ratio.unique().tolist()) == {0.0, 1.0, 2.0}


def test_mask_statistics_on_a_large_tensor(merge):
    # n = 200_000, keep probability 0.3: the kept fraction has sd sqrt(.3 * .7 / n) ~ 0.001,
    # allow 5 sd. E[rescaled] = delta: with delta = 1 everywhere the mean of the exact-rescaled
    # output is kept_fraction / 0.3, sd ~ 0.0034, allow 5 sd.
    n, density = 200_000, 0.3
    delta = torch.ones(n)
    out = dare(merge, [delta], density=density)
    kept = float((out != 0).float().mean())
    assert abs(kept - density) < 5 * math.sqrt(density * (1 - density) / n)
    assert abs(float(out.double().mean()) - 1.0) < 5 * math.sqrt((1 - density) / (density * n))
    # Masks of different tensors are independent: both kept ~ density^2 of the entries.
    other = dare(merge, [delta], density=density, name="model.layers.1.mlp.weight") != 0
    both = float(((out != 0) & other).float().mean())
    assert abs(both - density**2) < 5 * math.sqrt(density**2 * (1 - density**2) / n)


def test_defaults_keep_a_tenth_exactly_rescaled(merge):
    # Defaults: density 0.1 (p = 0.9), rescale exact, lambda 1, weight 1.
    n = 100_000
    out = merge("dare_linear", torch.zeros(n), [torch.full((n,), 0.5)])
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n)
    assert torch.equal(out[kept], torch.full((int(kept.sum()),), 5.0))


def test_all_zero_task_vectors_give_the_base(merge):
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    for method in ("dare_linear", "dare_ties"):
        for rescale in ("exact", "l1", "none"):
            out = merge(method, base, [base.clone(), base.clone()], params={"rescale": rescale})
            assert torch.equal(out, base)


def test_dare_ties_density_one_by_hand(merge):
    # No drop. Defaults of dare_ties: normalize false, so agreeing entries are summed.
    # d1 = [1, -2], d2 = [3, 1]: votes [4, -1] -> [+, -]; col0 1 + 3 = 4; col1 -2.
    base = torch.tensor([10.0, 10.0])
    out = merge(
        "dare_ties",
        base,
        [base + torch.tensor([1.0, -2.0]), base + torch.tensor([3.0, 1.0])],
        params={"density": 1.0},
    )
    assert torch.equal(out, torch.tensor([14.0, 8.0]))


@pytest.mark.parametrize("normalize", [True, False])
def test_dare_ties_is_disjoint_merge_of_the_dropped_deltas(merge, normalize):
    # Recover each model's dropped-and-rescaled delta from dare_linear on that model alone
    # (same tensor name, seed and model index), then apply the loop TIES merge to them.
    g = torch.Generator().manual_seed(12)
    n = 300
    deltas = [torch.randn(n, generator=g) for _ in range(3)]
    name = "model.layers.2.self_attn.o_proj.weight"
    dropped = []
    for i, d in enumerate(deltas):
        padded = [torch.zeros(n)] * i + [d]  # model index i, earlier models contribute nothing
        alone = merge("dare_linear", torch.zeros(n), padded, params={"density": 0.5}, name=name)
        dropped.append(flat(alone))
    out = merge(
        "dare_ties",
        torch.zeros(n),
        deltas,
        params={"density": 0.5, "normalize": normalize},
        name=name,
    )
    expected = disjoint_merge(dropped, [1.0, 1.0, 1.0], "sum", normalize)
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-6, atol=1e-6)
