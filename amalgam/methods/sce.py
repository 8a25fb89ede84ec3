"""SCE: select by variance, calculate weights, erase minority signs (FuseChat, arXiv 2408.07990).

As mergekit 0.1.5 defines ``sce``, per tensor with task vectors T_i = W_i - W_base:

1. Select (``select_topk`` < 1): keep the positions whose variance across models (population
   variance) is among the top floor(select_topk * #nonzero variances); T_i is zeroed elsewhere.
2. Calculate: c_i = mean(T_i^2) over the tensor, w_i = c_i / sum c (uniform if sum c < 1e-6).
3. Erase: elect the sign of sum_i T_i (a zero sum elects +); entries of the other sign drop.
4. W_base + sum_i w_i M_i T_i / max(sum_i w_i M_i, 1e-6).

The paper's own code (FuseChat) uses the selection only to compute the weights and merges the
unselected positions too; mergekit, and this module, zero them. Deviation: entries whose
variance ties with the selection threshold are all kept (mergekit's topk keeps an arbitrary
subset of the ties). The model count is fixed, so there is no per-model weight. Memory beyond
the inputs: two float32 tensors (variances, output), the rest block by block.
"""

from __future__ import annotations

import torch

from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.sparsify import as_rows, at_least, kth_largest, positive, row_chunks
from amalgam.methods.task_vectors import elect_sign

SELECT_TOPK = Param(
    "select_topk",
    0.1,
    "fraction of nonzero-variance positions kept (1: no selection)",
    low=0.0,
    high=1.0,
    low_open=True,
)


def selection(
    base: torch.Tensor, xs: list[torch.Tensor], fraction: float
) -> tuple[float, torch.Tensor] | None:
    """(threshold, variances) of the Select step, or None when every position is kept.

    A position is kept when its variance is at least the threshold (inf: none kept)."""
    if fraction >= 1.0:
        return None
    var = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    for rows in row_chunks(*base.shape):
        block = base[rows].float()
        deltas = torch.stack([x[rows].float() - block for x in xs])
        var[rows] = deltas.var(dim=0, unbiased=False)
    nonzero = int(torch.count_nonzero(var))
    k = int(nonzero * fraction)
    if k == 0:
        return float("inf"), var
    return kth_largest(var, k), var


def sce(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    b = as_rows(base)
    xs = [as_rows(x) for x in inputs]
    chunks = row_chunks(*b.shape)
    selected = selection(b, xs, p.shared["select_topk"])

    def deltas(rows: slice) -> list[torch.Tensor]:
        block = b[rows].float()
        ds = [x[rows].float() - block for x in xs]
        if selected is not None:
            threshold, var = selected
            if threshold == float("inf"):
                return [torch.zeros_like(block) for _ in xs]
            keep = at_least(var[rows], threshold)
            ds = [d.mul_(keep) for d in ds]
        return ds

    squares = torch.zeros(len(xs), dtype=torch.float64)
    for rows in chunks:
        for i, d in enumerate(deltas(rows)):
            squares[i] += float(d.square().sum(dtype=torch.float64))
    means = squares / max(b.numel(), 1)
    total = float(means.sum())
    weights = [1.0 / len(xs)] * len(xs) if abs(total) < 1e-6 else (means / total).tolist()

    out = torch.empty(b.shape, dtype=torch.float32, device=b.device)
    for rows in chunks:
        ds = deltas(rows)
        elected = elect_sign(ds, [1.0] * len(ds), "sum")
        mixed = torch.zeros_like(elected)
        divisor = torch.zeros_like(elected)
        for d, w in zip(ds, weights, strict=True):
            agree = positive(d * elected)
            mixed.addcmul_(d, agree, value=w)
            divisor.add_(agree, alpha=w)
        out[rows] = b[rows].float() + mixed / divisor.clamp_(min=1e-6)
    return out.reshape(base.shape)


register(
    Method(
        name="sce",
        fn=sce,
        params=(SELECT_TOPK,),
        summary="select high-variance positions, weight models by mean squared task vector, "
        "erase minority signs",
        paper="arXiv 2408.07990 (as mergekit's sce)",
    )
)
