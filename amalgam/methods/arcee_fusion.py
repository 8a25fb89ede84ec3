"""Arcee Fusion: keep the model's changes whose importance is an outlier (mergekit
``arcee_fusion``; no paper: Arcee's blog and mergekit 0.1.5).

Importance I = |W1 - W0| * KL(softmax(W1 row) || softmax(W0 row)), the KL taken per vector
along the last dimension (a 1-D tensor is one vector) with 1e-8 added to both distributions.
Entries with I >= median + 1.5 IQR keep the model's value, the rest the base's. Quantile q is
the sorted entry at index floor(q (n - 1)).

Deviation: mergekit estimates the quantiles from 10^6 entries drawn at random (with
replacement, global RNG) for tensors larger than that; amalgam always takes the exact order
statistics (deterministic, and equal to mergekit for tensors of at most 10^6 entries).
"""

from __future__ import annotations

import torch

from amalgam.methods.base import MergeContext, Method, TensorParams, register


def importance(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """|model - base| scaled by each row's KL divergence of the softmaxed model from the base."""
    p = torch.softmax(model, dim=-1).add_(1e-8)
    q = torch.softmax(base, dim=-1).add_(1e-8)
    kl = (p * (p / q).log_()).sum(dim=-1, keepdim=True)
    return (model - base).abs_().mul_(kl)


def order_statistic(flat: torch.Tensor, q: float) -> float:
    """The entry at index floor(q (n - 1)) of ``flat`` sorted ascending."""
    return flat.kthvalue(int(q * (flat.numel() - 1)) + 1).values.item()


def arcee_fusion(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    a, b = base.float(), inputs[0].float()
    scores = importance(a, b) if a.dim() else (b - a).abs()
    flat = scores.reshape(-1)
    q1, median, q3 = (order_statistic(flat, q) for q in (0.25, 0.5, 0.75))
    keep = scores >= median + 1.5 * (q3 - q1)
    return torch.where(keep, b, a)


register(
    Method(
        name="arcee_fusion",
        fn=arcee_fusion,
        params=(),
        summary="keep the model's changes whose KL-weighted size is an upper outlier",
        paper="mergekit arcee_fusion (Arcee blog, no paper)",
        max_models=1,
    )
)
