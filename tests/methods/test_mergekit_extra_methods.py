"""nearswap, arcee_fusion, ram, ramplus_tl and passthrough against loop formulations of
mergekit 0.1.5's formulas, hand-worked cases, and their recipe contracts."""

from __future__ import annotations

import pytest
import torch

from amalgam.errors import RecipeError
from amalgam.recipe import parse_recipe

from . import naive_mergekit_extra as naive
from .naive import as_tensor, flat


def _pair(shape, seed, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    return a, a + spread * torch.randn(shape, generator=g)


def test_nearswap_by_hand(merge):
    # t = 0.1: |diff| 0.05 <= t takes b; |diff| 0.5 moves by w = 0.2 of the way: 0.1.
    a, b = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([1.05, 0.5, 2.0])
    out = merge("nearswap", a, [b], params={"t": 0.1})
    torch.testing.assert_close(out, torch.tensor([1.05, 0.1, 2.0]))


@pytest.mark.parametrize("t", [1e-4, 0.01, 0.2])
@pytest.mark.parametrize("shape", [(7,), (4, 9)])
def test_nearswap_matches_loop(merge, shape, t):
    a, b = _pair(shape, 3)
    out = merge("nearswap", a, [b], params={"t": t})
    expected = naive.nearswap(flat(a), flat(b), t)
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-5, atol=1e-6)


def test_nearswap_needs_t():
    with pytest.raises(RecipeError, match=r"params\.t: nearswap needs t"):
        parse_recipe({"method": "nearswap", "base": "b", "models": [{"uri": "m"}]})


@pytest.mark.parametrize("shape", [(40,), (12, 30), (3, 4, 20)])
def test_arcee_fusion_matches_loop(merge, shape):
    g = torch.Generator().manual_seed(len(shape))
    a = torch.randn(shape, generator=g)
    # a few rows change a lot, so the importance has real outliers
    b = a + 0.01 * torch.randn(shape, generator=g)
    b.reshape(-1, shape[-1])[0, :5] += 2.0
    out = merge("arcee_fusion", a, [b])
    rows_a = a.double().reshape(-1, shape[-1]).tolist()
    rows_b = b.double().reshape(-1, shape[-1]).tolist()
    expected = [v for row in naive.arcee_fusion(rows_a, rows_b) for v in row]
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-6, atol=1e-7)
    changed = (out != a).sum().item()
    assert 0 < changed < out.numel(), "an outlier threshold keeps some changes, not all"


def test_ram_by_hand(merge):
    # entry 0: only model 1 changes it (unique) -> +1; entry 1: both change it (shared) ->
    # mean (2 + 4) / 2 = 3; entry 2: a change below epsilon counts as none -> base.
    base = torch.zeros(3)
    m1, m2 = torch.tensor([1.0, 2.0, 1e-7]), torch.tensor([0.0, 4.0, 0.0])
    torch.testing.assert_close(merge("ram", base, [m1, m2]), torch.tensor([1.0, 3.0, 0.0]))
    # RAM+: model 1 has 1 shared and 1 unique entry, rho = 1 clamped to alpha 0.2:
    # its unique entry is boosted by 1 + 0.1 * 0.2 = 1.02.
    out = merge("ramplus_tl", base, [m1, m2])
    torch.testing.assert_close(out, torch.tensor([1.02, 3.0, 0.0]))


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_ram_matches_loop(merge, method, n):
    g = torch.Generator().manual_seed(n)
    base = torch.randn(6, 8, generator=g)
    models = []
    for _ in range(n):
        tau = torch.randn(6, 8, generator=g) * (torch.rand(6, 8, generator=g) < 0.4)
        models.append(base + tau)
    params = {"epsilon": 1e-3, "r": 0.5, "alpha": 0.7} if method == "ramplus_tl" else {}
    out = merge(method, base, models, params=params)
    expected = naive.ram(
        flat(base),
        [flat(m) for m in models],
        params.get("epsilon", 1e-5),
        params.get("r", 0.0),
        params.get("alpha", 0.0),
        plus=method == "ramplus_tl",
    )
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-5, atol=1e-6)


def test_passthrough_scales(merge):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(merge("passthrough", None, [x]), x)
    out = merge(
        "passthrough",
        None,
        [x],
        name="model.layers.0.mlp.down_proj.weight",
        overrides=[{"match": "down_proj", "params": {"scale": 0.5}}],
    )
    torch.testing.assert_close(out, x * 0.5)


@pytest.mark.parametrize(
    ("method", "models", "base", "message"),
    [
        ("arcee_fusion", 2, "b", "takes at most 1 models"),
        ("arcee_fusion", 1, None, "needs a base model"),
        ("passthrough", 2, None, "takes at most 1 models"),
        ("ram", 1, None, "needs a base model"),
    ],
)
def test_contracts(method, models, base, message):
    recipe = {"method": method, "base": base, "models": [{"uri": f"m{i}"} for i in range(models)]}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe)
