"""PCB-Merging: Parameter Competition Balancing, per tensor (arXiv 2410.02396).

For each tensor (all tensors alike, 1-D and embeddings included) and model i, with task vector
t_i = W_i - W0 and N models:
  a_i = |t_i| clamped to its ``clamp`` and 1 - ``clamp`` order statistics (outliers);
  intra_i = exp(N * norm(a_i)^2), norm = min-max scaling over the tensor (the paper's softmax of
  N * norm(t_i * t_i) up to a positive factor, which the last min-max removes);
  inter_i = tanh(t_i * sum_j t_j) (the official ``pcb-merging.py``; the paper's
  sum_j softmax(norm(t_i * t_j)) is not implemented);
  beta_i = norm(max(intra_i * inter_i, its order statistic at floor(n (1 - density)))), so only
  entries above the top-``density`` threshold get a weight, in (0, 1];
  W = W0 + lambda * sum_i w_i beta_i sign(t_i) a_i / max(sum_i beta_i, 1e-12).
Order statistics index the ascending sort as the official code does. Variant: every statistic
is taken per tensor, where the official code takes it over each model's whole flattened task
vector. A constant tensor has norm 0 everywhere (the official code divides by zero).
The official code searches per-model lambda_i in [0.8, 1.3]; here ``weight`` plays lambda_i.
"""

from __future__ import annotations

import torch

from amalgam.merge.base import MergeContext, Method, Param, TensorParams, register
from amalgam.merge.task_vectors import LAMBDA, WEIGHT

PARAMS = (
    WEIGHT,
    Param(
        "density",
        0.1,
        "fraction of entries of each task vector that get a weight (the paper's ratio r)",
        per_model=True,
        low=0.0,
        high=1.0,
        low_open=True,
    ),
    Param(
        "clamp",
        0.0001,
        "fraction of magnitudes clamped at each end before balancing (outliers)",
        low=0.0,
        high=0.5,
    ),
    LAMBDA,
)


def order_statistic(flat: torch.Tensor, index: int) -> torch.Tensor:
    """Entry ``index`` (0-based, clipped to the range) of ``flat`` sorted ascending."""
    index = min(max(index, 0), flat.numel() - 1)
    return flat.kthvalue(index + 1).values


def min_max(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) over the whole tensor; zeros where max == min."""
    low, high = x.min(), x.max()
    span = high - low
    return (x - low) / span if bool(span > 0) else torch.zeros_like(x)


def pcb_merge(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    b = base.float().reshape(-1)
    n, size, q = len(inputs), b.numel(), p.shared["clamp"]
    if size == 0:
        return base.float().clone()
    total = torch.zeros_like(b)
    for x in inputs:
        total.add_(x.reshape(-1)).sub_(b)
    num, den = torch.zeros_like(b), torch.zeros_like(b)
    for x, m in zip(inputs, p.per_model, strict=True):
        t = torch.sub(x.reshape(-1), b)
        mag = t.abs()
        mag = mag.clamp_(
            order_statistic(mag, int(size * q)), order_statistic(mag, int(size * (1 - q)) - 1)
        )
        beta = min_max(mag).square_().mul_(n).exp_().mul_(torch.tanh(t * total))
        beta = min_max(beta.clamp_(min=order_statistic(beta, int(size * (1 - m["density"])))))
        num.addcmul_(beta, t.sign_().mul_(mag), value=m["weight"])
        den.add_(beta)
    merged = num.div_(den.clamp_(min=1e-12))
    return torch.add(b, merged, alpha=p.shared["lambda"]).reshape(base.shape)


register(
    Method(
        name="pcb",
        fn=pcb_merge,
        params=PARAMS,
        summary="weight task-vector entries by intra- and inter-task balancing, keep the top ratio",
        paper="arXiv 2410.02396",
    )
)
