"""R-TSVM: reweighting-enhanced task singular vector merging (arXiv 2502.06876, "Mix Data or
Merge Models? Balancing the Helpfulness, Honesty, and Harmlessness of Large Language Model via
Model Merging"), per 2-D matrix, built on TSV-M (``tsv.py``).

The paper names two additions to TSV-M: outlier-aware parameter weighting (task vectors of LLMs
are heavy-tailed) and a sparsity-adaptive rank per task in place of TSV-M's fixed
floor(r / N). Its method section was not available to us, so both are our reading of those
names, stated here exactly:

1. Outlier-aware weights. Each model's weighted task vector tau_i = w_i (W_i - W0) of a tensor
   gets per-entry weights min(1, c s_i / |tau_i|), where s_i = 1.4826 median |tau_i| over its
   non-zero entries (the median absolute deviation about 0, a robust standard deviation; the
   lower middle value for an even count) and
   c is ``outlier``: entries beyond c robust deviations are shrunk to that bound (Huber
   weights, i.e. tau_i clipped to [-c s_i, c s_i]); ``outlier: 0`` turns this off.
2. Sparsity-adaptive rank. Task i's rank is its energy rank e_i: the fewest leading singular
   values of the reweighted tau_i holding ``energy`` of its squared Frobenius norm. While the
   tasks' ranks fit the matrix (sum e_i <= r = min(m, n)) each keeps e_i triplets; otherwise
   each keeps floor(r e_i / sum_j e_j), so a task whose update is concentrated in few
   directions leaves room for one that is spread out. ``rank: fixed`` keeps TSV-M's
   floor(r / N) for every task.

The kept triplets then go through TSV-M's orthogonalisation and sum (``tsv.orthogonal_sum``,
with its departures from the authors' TSV-M code), W = W0 + lambda * U diag(sigma) V^T.
With ``outlier: 0`` and ``rank: fixed`` this is TSV-M exactly. Tensors that are not 2-D,
matrices with fewer rows or columns than models, and tensors set to ``svd: none`` take lambda
times the mean of the reweighted task vectors. The SVDs are exact (no randomized variant: the
energy rank needs the whole spectrum). Deterministic: no randomness.
"""

from __future__ import annotations

import torch

from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.svd import top_singular
from amalgam.methods.task_vectors import LAMBDA, WEIGHT
from amalgam.methods.tsv import orthogonal_sum

MAD_TO_STD = 1.4826  # median |x| of a normal sample times this is its standard deviation

OUTLIER = Param(
    "outlier", 3.0, "shrink task-vector entries beyond this many robust deviations (0: off)",
    low=0.0, gradient=False,
)  # fmt: skip
ENERGY = Param(
    "energy", 0.9, "share of a task vector's squared norm its adaptive rank keeps",
    low=0.0, low_open=True, high=1.0, gradient=False,
)  # fmt: skip
RANK = Param(
    "rank", "adaptive", "per-task rank: adaptive (energy, sparsity-aware) or TSV-M's floor(r/N)",
    kind=str, choices=("adaptive", "fixed"), gradient=False,
)  # fmt: skip
SVD = Param(
    "svd", "full", "2-D tensors: exact SVD, or none (plain mean of task vectors)",
    kind=str, choices=("full", "none"), gradient=False,
)  # fmt: skip


def outlier_weighted(delta: torch.Tensor, c: float) -> torch.Tensor:
    """``delta`` with each entry weighted by min(1, c s / |entry|), s the robust deviation of
    its non-zero entries (1.4826 x their median magnitude); unchanged when c is 0."""
    magnitude = delta.abs()
    nonzero = magnitude[magnitude > 0]
    if c == 0 or nonzero.numel() == 0:
        return delta
    bound = c * MAD_TO_STD * float(nonzero.median())
    return delta.clamp(-bound, bound)


def energy_rank(s: torch.Tensor, total: float, energy: float) -> int:
    """The fewest leading singular values whose squares hold ``energy`` of ``total`` (the
    squared Frobenius norm); 0 for a zero matrix."""
    if total <= 0:
        return 0
    cumulative = torch.cumsum(s.double().pow(2), 0)
    return min(int((cumulative < energy * total).sum()) + 1, s.numel())


def adaptive_ranks(ranks: list[int], r: int) -> list[int]:
    """Each task's energy rank while they fit in r; otherwise r shared in proportion to them."""
    total = sum(ranks)
    if total <= r:
        return list(ranks)
    return [r * e // total for e in ranks]


def r_tsvm_merge(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    b = base.float()
    weights, lam, c = p.each("weight"), p.shared["lambda"], float(p.shared["outlier"])
    n = len(inputs)
    deltas = [
        outlier_weighted(torch.sub(x, b).mul_(w), c) for x, w in zip(inputs, weights, strict=True)
    ]
    r = min(base.shape) if base.dim() == 2 else 0
    if p.shared["svd"] == "none" or r < n:
        return torch.add(b, torch.stack(deltas).mean(0), alpha=lam)
    spectra = [top_singular(d, r) for d in deltas]
    if p.shared["rank"] == "fixed":
        ranks = [r // n] * n
    else:
        energy = float(p.shared["energy"])
        ranks = adaptive_ranks(
            [
                energy_rank(s, float(d.double().pow(2).sum()), energy)
                for d, (_, s, _) in zip(deltas, spectra, strict=True)
            ],
            r,
        )
    triplets = [(u[:, :k], s[:k], vh[:k]) for (u, s, vh), k in zip(spectra, ranks, strict=True)]
    return orthogonal_sum(b, triplets, lam)


register(
    Method(
        name="r_tsvm",
        fn=r_tsvm_merge,
        params=(WEIGHT, LAMBDA, OUTLIER, ENERGY, RANK, SVD),
        summary="TSV-M with outlier-shrunk task vectors and an energy-adaptive rank per task",
        paper="arXiv 2502.06876",
        gpu_bound=True,
    )
)
