"""TSV-M: Task Singular Vectors merge, per 2-D matrix (arXiv 2412.00081).

Each model's weighted task vector w_i (W_i - W0) of a matrix is cut to its top k = floor(r / N)
singular triplets (r = min(m, n)); the N blocks of left and of right singular vectors are
stacked and each replaced by its orthogonal polar factor (the paper's Procrustes step, the
``TSVM`` variant of the authors' code), and W = W0 + lambda * U diag(sigma) V^T.
Tensors that are not 2-D, tensors set to ``svd: none`` (e.g. by an override on embeddings), and
matrices with fewer rows or columns than models (k = 0) take lambda times the mean of the
weighted task vectors, as the authors' code does for non-matrix tensors.

Departures from the authors' code, both where the paper's polar factor is not unique: singular
triplets below the numerical-rank tolerance are dropped before orthogonalisation (their vectors
are arbitrary: a task vector of rank below k, or an expert that left this matrix untouched, and
would rotate the other tasks' vectors), and a rank-deficient stack (experts sharing directions,
e.g. duplicates) is replaced by its partial isometry instead of an arbitrary completion (which
adds a null-space term as large as the merge). Where every task has rank at least k and the
stacks have full rank, this is exactly the paper's computation.
"""

from __future__ import annotations

import torch

from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.svd import numerical_rank, polar, top_singular
from amalgam.methods.task_vectors import LAMBDA, WEIGHT

SVD = Param(
    "svd",
    "full",
    "2-D tensors: exact SVD, randomized low-rank SVD, or none (plain mean of task vectors)",
    kind=str,
    choices=("full", "lowrank", "none"),
    gradient=False,
)


def tsv_merge(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    b = base.float()
    weights, lam, mode = p.each("weight"), p.shared["lambda"], p.shared["svd"]
    n = len(inputs)
    k = min(base.shape) // n if base.dim() == 2 else 0
    if mode == "none" or k == 0:
        mean = torch.zeros_like(b)
        for x, w in zip(inputs, weights, strict=True):
            mean.add_(torch.sub(x, b), alpha=w / n)
        return torch.add(b, mean, alpha=lam)
    triplets = [
        top_singular(torch.sub(x, b).mul_(w), k, mode == "lowrank", ctx.generator(i))
        for i, (x, w) in enumerate(zip(inputs, weights, strict=True))
    ]
    return orthogonal_sum(b, triplets, lam)


Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def orthogonal_sum(b: torch.Tensor, triplets: list[Triplets], lam: float) -> torch.Tensor:
    """b + lam * U diag(sigma) V^T from each task's (U_i, S_i, Vh_i), its chosen leading
    singular triplets: triplets below the numerical-rank tolerance dropped, the stacked U_i and
    Vh_i each replaced by their orthogonal polar factor (the Procrustes step)."""
    us, ss, vhs = [], [], []
    for u, s, vh in triplets:
        kept = numerical_rank(s, (b.shape[0], b.shape[1]))
        us.append(u[:, :kept])
        ss.append(s[:kept])
        vhs.append(vh[:kept])
    sigma = torch.cat(ss)
    if sigma.numel() == 0:
        return b.clone()
    u_orth = polar(torch.cat(us, dim=1))
    vh_orth = polar(torch.cat(vhs, dim=0))
    return torch.addmm(b, u_orth * sigma, vh_orth, alpha=lam)


register(
    Method(
        name="tsv_m",
        fn=tsv_merge,
        params=(WEIGHT, LAMBDA, SVD),
        summary="per matrix: each task's top 1/N singular triplets, orthogonalised, summed",
        paper="arXiv 2412.00081",
        gpu_bound=True,
    )
)
