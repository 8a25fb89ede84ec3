"""NuSLERP: spherical interpolation of two models or of their task vectors (mergekit's nuslerp).

As mergekit 0.1.5 defines it: t = w_2 / (w_1 + w_2) from the two models' weights (0.5 when
they sum to under 1e-6). With a base, the two task vectors are interpolated and added to the
base; without, the two models' weights. ``flatten`` (default) takes each tensor as one vector;
otherwise each vector runs along the last dimension (``row_wise: false``) or the first
(``row_wise: true``). Per vector: the angle comes from the normalised vectors, the sines
weigh the raw ones; (anti)parallel vectors (1 - cos^2 <= 1e-16) are interpolated linearly.
In float32 that test holds only for exactly (anti)parallel vectors: nearly antiparallel ones
divide by a tiny sine and blow up, exactly as in mergekit (kept for parity).
"""

from __future__ import annotations

import torch

from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.task_vectors import WEIGHT

COLINEAR_EPS = 1e-8
NORM_EPS = 1e-7


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp of each pair of vectors along the last dimension (float32, mergekit's op order)."""
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=NORM_EPS)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, out)


def nuslerp(
    base: torch.Tensor | None, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    w0, w1 = p.each("weight")
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    a, b = inputs[0].float(), inputs[1].float()
    if base is not None:
        a, b = a - base.float(), b - base.float()
    if p.shared["flatten"]:
        out = nuslerp_vectors(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    elif p.shared["row_wise"]:
        out = nuslerp_vectors(t, a.transpose(0, -1), b.transpose(0, -1)).transpose(0, -1)
    else:
        out = nuslerp_vectors(t, a, b)
    return out if base is None else base.float() + out


register(
    Method(
        name="nuslerp",
        fn=nuslerp,
        params=(
            WEIGHT,
            Param("flatten", True, "interpolate each tensor as one vector", kind=bool),
            Param(
                "row_wise",
                False,
                "without flatten: vectors along the first dimension, not the last",
                kind=bool,
            ),
        ),
        summary="spherical interpolation of two models (or their task vectors over a base), "
        "t from their weights",
        paper="mergekit nuslerp (Shoemake 1985)",
        needs_base=False,
        min_models=2,
        max_models=2,
    )
)
