"""Multi-SLERP: a spherical weighted mean of N models or task vectors (mergekit's multislerp).

As mergekit 0.1.5 defines it, per tensor: x_i is model i's tensor (minus the base's, with a
base); weights are normalised to sum to 1 (``normalize_weights``); u_i = x_i / (|x_i| + eps);
m = sum_i w_i u_i, normalised; the weighted tangent vectors u_i - <u_i, m> m are summed and
mapped back to the sphere by one exponential-map step; the result is scaled by sum_i w_i |x_i|
(and the base added back). The weighted tangent sum is zero up to rounding (it is m minus
its own projection), so the result is the normalised weighted mean direction: the
computation keeps mergekit's steps so the two agree to float rounding. One model: that
model's tensor unchanged. A weighted mean direction of norm under eps falls back to the
weighted sum for two models and is an error for more, as in mergekit, except where every
input is zero (a tensor no model changed from the base, such as a LoRA expert's lm_head):
the result is then zero (the base), where mergekit raises. The norms and the mean
are over whole tensors: memory is about 2N float32 copies of the tensor being merged.
"""

from __future__ import annotations

import torch

from amalgam.errors import MergeError
from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.task_vectors import WEIGHT


def multislerp(
    base: torch.Tensor | None, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    if len(inputs) == 1:
        return inputs[0].float()
    eps = p.shared["eps"]
    x = torch.stack([t.float() for t in inputs])
    if base is not None:
        x -= base.float()
    flat = x.view(x.shape[0], -1)
    w = torch.tensor(p.each("weight"), dtype=torch.float32, device=x.device)
    if p.shared["normalize_weights"]:
        if abs(float(w.sum())) < 1e-12:
            raise MergeError(f"{ctx.name}: multislerp weights sum to 0; cannot normalise them")
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if len(inputs) != 2 and float(norms.max()) > 0:
            raise MergeError(
                f"{ctx.name}: the weighted mean direction of the {len(inputs)} models is zero "
                "(antipodal tensors with balancing weights); change the weights"
            )
        out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
    else:
        mean = mean / mean_norm
        tangent = units - (units * mean).sum(-1, keepdim=True) * mean
        step = (tangent * w.view(-1, 1)).sum(0)
        angle = step.norm() + eps
        out = mean * torch.cos(angle) + step * (torch.sin(angle) / angle)
        out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out if base is None else out + base.float()


register(
    Method(
        name="multislerp",
        fn=multislerp,
        params=(
            WEIGHT,
            Param("normalize_weights", True, "divide the weights by their sum", kind=bool),
            Param("eps", 1e-8, "guard added to norms", low=0.0, gradient=False),
        ),
        summary="spherical weighted mean of N models (or task vectors over a base)",
        paper="mergekit multislerp (goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
        needs_base=False,
    )
)
