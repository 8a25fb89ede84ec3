"""Spherical linear interpolation of two models' weights (as popularised by mergekit).

Interpolation is between the base (t = 0) and the single model (t = 1); without a base,
between the first and second model. Near-collinear tensors (|cos| > 0.9995) fall back to
linear interpolation. ``t`` may be a list: a gradient across layer index.
"""

from __future__ import annotations

import math

import torch

from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_pair(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Slerp coefficients from the normalised directions, applied to the raw tensors."""
    na = a.norm(dtype=torch.float64).item()
    nb = b.norm(dtype=torch.float64).item()
    dot = torch.dot(a.reshape(-1).double(), b.reshape(-1).double()).item()
    cos = dot / ((na if na > EPS else 1.0) * (nb if nb > EPS else 1.0))
    if abs(cos) > DOT_THRESHOLD:
        return (1 - t) * a + t * b
    omega = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b


def slerp(
    base: torch.Tensor | None, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    a, b = (base, inputs[0]) if base is not None else (inputs[0], inputs[1])
    return slerp_pair(p.shared["t"], a.float(), b.float())


register(
    Method(
        name="slerp",
        fn=slerp,
        params=(
            Param("t", 0.5, "0 gives the base (or first model), 1 the other", low=0.0, high=1.0),
        ),
        summary="spherical interpolation of exactly two models (base + one model, or two models)",
        paper="Shoemake 1985; mergekit slerp",
        needs_base=False,
        min_models=1,
        max_models=2,
    )
)
