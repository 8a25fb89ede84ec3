"""SLERP: Shoemake's formula with an explicit angle, endpoints, collinear fallback, t gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amalgam.errors import RecipeError
from amalgam.recipe import parse_recipe

from .naive import as_tensor, flat, slerp


def test_quarter_turn_by_hand(merge):
    # a = e1, b = e2: angle pi/2, sin = 1. t = 0.5: sin(pi/4) (e1 + e2) = [r2/2, r2/2].
    # t = 1/3: [sin(pi/3), sin(pi/6)] = [r3/2, 1/2] (rotating e1 by pi/6).
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    half = merge("slerp", a, [b])
    torch.testing.assert_close(half, torch.tensor([math.sqrt(2) / 2, math.sqrt(2) / 2]))
    third = merge("slerp", a, [b], params={"t": 1 / 3})
    torch.testing.assert_close(third, torch.tensor([math.sqrt(3) / 2, 0.5]))


def test_coefficients_apply_to_unnormalised_tensors_by_hand(merge):
    # a = [2, 0], b = [0, 3]: same angle pi/2, so t = 0.5 gives sin(pi/4) * (a + b)
    # = [2 r2/2, 3 r2/2] = [r2, 1.5 r2]; the norms are not renormalised.
    out = merge("slerp", torch.tensor([2.0, 0.0]), [torch.tensor([0.0, 3.0])])
    torch.testing.assert_close(out, torch.tensor([math.sqrt(2), 1.5 * math.sqrt(2)]))


@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("shape", [(), (2,), (16,), (4, 8), (2, 3, 4)])
def test_matches_explicit_angle_formula(merge, shape, t):
    g = torch.Generator().manual_seed(len(shape) + int(10 * t))
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    out = merge("slerp", a, [b], params={"t": t})
    expected = slerp(t, flat(a), flat(b))
    torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-5, atol=1e-6)


def test_endpoints(merge):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    torch.testing.assert_close(merge("slerp", a, [b], params={"t": 0.0}), a)
    torch.testing.assert_close(merge("slerp", a, [b], params={"t": 1.0}), b)


def test_two_models_without_base(merge):
    # Without a base, the first model is t = 0 and the second t = 1.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = merge("slerp", None, [a, b], params={"t": 0.5})
    torch.testing.assert_close(out, torch.tensor([math.sqrt(2) / 2, math.sqrt(2) / 2]))
    torch.testing.assert_close(merge("slerp", None, [a, b], params={"t": 0.0}), a)


def test_collinear_and_antiparallel_fall_back_to_lerp(merge):
    a = torch.tensor([1.0, 2.0, -2.0])
    # parallel: b = 3a, cos 1 -> (1 - .25) a + .25 * 3a = 1.5 a
    out = merge("slerp", a, [3 * a], params={"t": 0.25})
    torch.testing.assert_close(out, 1.5 * a)
    # anti-parallel: b = -a, cos -1 -> (1 - .25) a - .25 a = 0.5 a (no division by sin pi = 0)
    out = merge("slerp", a, [-a], params={"t": 0.25})
    torch.testing.assert_close(out, 0.5 * a)


def unit_pair(cos: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([1.0, 0.0]), torch.tensor([cos, math.sqrt(1 - cos * cos)])


def test_threshold_separates_lerp_from_slerp(merge):
    # cos 0.9996 > 0.9995: lerp, whose midpoint of two unit vectors has norm cos(theta/2) < 1.
    a, b = unit_pair(0.9996)
    near = merge("slerp", a, [b])
    torch.testing.assert_close(near, (a + b) / 2)
    # cos 0.999 < 0.9995: true slerp, whose midpoint stays on the unit circle. The gap to lerp
    # is 1 - cos(theta/2) ~ 2.5e-4, far above float32 rounding.
    a, b = unit_pair(0.999)
    mid = merge("slerp", a, [b])
    assert abs(float(mid.norm()) - 1.0) < 1e-6
    assert float(((a + b) / 2).norm()) < 1 - 2e-4
    torch.testing.assert_close(mid.double(), as_tensor(slerp(0.5, flat(a), flat(b)), mid))


def test_zero_norm_input_is_not_normalised(merge):
    # a = 0: cos = 0, angle pi/2, result sin(t pi/2) * b (the a term vanishes).
    b = torch.tensor([3.0, -4.0])
    out = merge("slerp", torch.zeros(2), [b], params={"t": 0.3})
    torch.testing.assert_close(out, math.sin(0.3 * math.pi / 2) * b)


def test_t_gradient_across_layers(merge):
    # t: [0, 1] over 5 layers: layer l gets x = l / 4 and t = x; a tensor outside the layer
    # stack (no index) takes the first value, t = 0, so it is the base.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for layer in range(5):
        out = merge(
            "slerp",
            a,
            [b],
            params={"t": [0.0, 1.0]},
            name=f"model.layers.{layer}.mlp.up_proj.weight",
            num_layers=5,
        )
        angle = (layer / 4) * math.pi / 2
        torch.testing.assert_close(out, torch.tensor([math.cos(angle), math.sin(angle)]))
    head = merge("slerp", a, [b], params={"t": [0.0, 1.0]}, name="lm_head.weight", num_layers=5)
    torch.testing.assert_close(head, a)


def test_piecewise_t_gradient_matches_np_interp(merge):
    values = [0.2, 0.9, 0.4]
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(10, generator=g), torch.randn(10, generator=g)
    for layer in range(7):
        t = float(np.interp(layer / 6, np.linspace(0, 1, len(values)), values))
        out = merge(
            "slerp", a, [b], params={"t": values}, name=f"model.layers.{layer}.w", num_layers=7
        )
        expected = slerp(t, flat(a), flat(b))
        torch.testing.assert_close(out.double(), as_tensor(expected, out), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("base", "n_models"),
    [("base", 2), (None, 1), (None, 3)],
)
def test_needs_exactly_two_models(base, n_models):
    with pytest.raises(RecipeError):
        parse_recipe(
            {"method": "slerp", "base": base, "models": [{"uri": f"m{i}"} for i in range(n_models)]}
        )


def test_t_outside_unit_interval_is_rejected():
    with pytest.raises(RecipeError, match=r"params\.t"):
        parse_recipe(
            {"method": "slerp", "base": "b", "models": [{"uri": "m"}], "params": {"t": 1.5}}
        )
