"""The shared machinery of task-vector methods: deltas, sign election, disjoint or plain sums.

One function, ``combine``, serves task arithmetic, TIES, DARE and Breadcrumbs (and their
sign-consensus variants): each method only chooses how task vectors are sparsified.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from amalgam.methods.base import MergeContext, Param, TensorParams
from amalgam.methods.kernels import merge as fused
from amalgam.methods.sparsify import as_rows, positive, row_chunks

WEIGHT = Param("weight", 1.0, "scale of this model's task vector", per_model=True)
LAMBDA = Param("lambda", 1.0, "global scale of the merged task vector")
DENSITY = Param(
    "density",
    0.2,
    "fraction of task-vector entries kept",
    per_model=True,
    low=0.0,
    high=1.0,
    low_open=True,
)
CONSENSUS = Param(
    "consensus",
    "sum",
    "sign election: by summed mass or by count",
    kind=str,
    choices=("sum", "count"),
    gradient=False,
)


def normalize_param(default: bool) -> Param:
    return Param(
        "normalize", default, "divide by the sum of (agreeing) weights", kind=bool, gradient=False
    )


def elect_sign(deltas: list[torch.Tensor], weights: list[float], consensus: str) -> torch.Tensor:
    """Elected sign per entry (+1 or -1) of the weighted deltas w_i d_i, by summed mass
    (``sum``) or by count of signs (``count``); a zero vote elects +1."""
    votes = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights, strict=True):
        add_vote(votes, d, w, consensus)
    return votes.sign_().add_(0.5).sign_()


def add_vote(votes: torch.Tensor, d: torch.Tensor, w: float, consensus: str) -> None:
    """Add one model's vote (delta ``d``, weight ``w``) into ``votes`` in place."""
    if consensus == "sum":
        votes.add_(d, alpha=w)
    else:
        votes.add_(d.sign(), alpha=math.copysign(1.0, w) if w else 0.0)


def add_agreeing(
    mixed: torch.Tensor, divisor: torch.Tensor, d: torch.Tensor, w: float, elected: torch.Tensor
) -> None:
    """Add w * d where it agrees with the ``elected`` sign into ``mixed``, and w there into
    ``divisor``, in place (a zero weight never agrees)."""
    if w == 0:
        return  # w * d is zero everywhere: it never agrees
    agree = positive(d * elected if w > 0 else d * elected.neg())  # sign(w d) == elected
    mixed.addcmul_(d, agree, value=w)
    divisor.add_(agree, alpha=w)


def normalize_mixed(
    mixed: torch.Tensor, divisor: torch.Tensor | float, weights: list[float]
) -> None:
    """Divide ``mixed`` in place by the (agreeing) weight sum ``divisor``: a divisor below
    1e-8 counts as 1."""
    if isinstance(divisor, torch.Tensor):
        nonzero = [w for w in weights if w != 0]
        if nonzero and min(nonzero) >= 1e-8:
            # positive weights: a divisor is 0 (then mixed is 0 too) or at least min weight
            divisor.clamp_(min=min(nonzero))
        else:
            small = positive(1e-8 - divisor.abs())
            divisor.addcmul_(small, 1 - divisor)  # exactly 1 where |divisor| < 1e-8
        mixed /= divisor
    elif abs(divisor) >= 1e-8:
        mixed /= divisor


def combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    lam: float,
    normalize: bool,
    consensus: str | None = None,
) -> torch.Tensor:
    """base + lam * (sum_i w_i d_i [agreeing with the elected sign]) / (sum of those w_i).

    With ``consensus`` set, only entries whose weighted delta has the elected sign count
    (TIES' disjoint merge); exact zeros never count. A divisor below 1e-8 is replaced by 1.
    Accumulates model by model in place: a few block-sized buffers, whatever the model count.
    """
    mixed = torch.zeros_like(base)
    if consensus is None:
        for d, w in zip(deltas, weights, strict=True):
            mixed.add_(d, alpha=w)
        divisor: torch.Tensor | float = sum(weights)
    else:
        elected = elect_sign(deltas, weights, consensus)
        divisor = torch.zeros_like(base)
        for d, w in zip(deltas, weights, strict=True):
            add_agreeing(mixed, divisor, d, w, elected)
    if normalize:
        normalize_mixed(mixed, divisor, weights)
    return torch.add(base, mixed, alpha=lam)


@dataclass(frozen=True)
class TaskVector:
    """One model's whole float32 task vector (as rows), computed when called; ``x`` and ``base``
    (rows, stored dtypes) let a kernel read it without building it."""

    x: torch.Tensor
    base: torch.Tensor
    base32: Callable[[], torch.Tensor]

    def __call__(self) -> torch.Tensor:
        return torch.sub(self.x, self.base32())


Applier = Callable[[torch.Tensor, slice], torch.Tensor]


# Given one model's task vector (only sparsifiers that need whole-tensor statistics compute
# it), return how to sparsify any block of its rows.
Sparsifier = Callable[[TaskVector, int, TensorParams, MergeContext], Applier]


# Given one block's raw task vectors and their merged (unscaled) task vector, a 0/1 mask for the
# merged vector (Consensus merging's agreement of TALL masks).
Masker = Callable[[list[torch.Tensor], torch.Tensor, TensorParams], torch.Tensor]


def task_vector_merge(
    sparsify: Sparsifier | None,
    consensus: bool,
    base: torch.Tensor,
    inputs: list[torch.Tensor],
    p: TensorParams,
    ctx: MergeContext,
    mask: Masker | None = None,
) -> torch.Tensor:
    """Task vectors against ``base``, sparsified per model, then ``combine``d block by block.

    With ``mask``, the merged task vector (before the lambda scale) is multiplied by the mask
    computed from it and the raw (unsparsified) task vectors.

    Whole-tensor statistics (thresholds, masks, norms) come first, one model at a time; the
    elementwise work then runs in float32 on cache-sized row blocks, so memory beyond the inputs
    (kept in their stored dtype) is about two float32 tensors, whatever the number of models.
    On CPU, without ``mask``, with trim or DARE appliers (or none), one fused kernel pass
    (``kernels.merge``) computes the same bytes, stored in ``ctx.out_dtype``.
    """
    b = as_rows(base)
    xs = [as_rows(x) for x in inputs]
    appliers = None
    if sparsify is not None:
        base32 = cache(b.float)  # converted once, and only if a sparsifier needs it
        appliers = [sparsify(TaskVector(x, b, base32), i, p, ctx) for i, x in enumerate(xs)]
        base32.cache_clear()
    weights, lam, normalize = p.each("weight"), p.shared["lambda"], p.shared["normalize"]
    vote = p.shared["consensus"] if consensus else None
    if mask is None and b.device.type == "cpu":
        out = fused.task_vector_merge(b, xs, appliers, weights, lam, normalize, vote, ctx.out_dtype)
        if out is not None:
            return out.reshape(base.shape)
    out = torch.empty(b.shape, dtype=torch.float32, device=b.device)
    for rows in row_chunks(*b.shape):
        block = b[rows].float()
        raw = [torch.sub(x[rows], block) for x in xs]
        deltas = raw
        if appliers is not None:
            deltas = [f(d, rows) for f, d in zip(appliers, raw, strict=True)]
        if mask is None:
            out[rows] = combine(block, deltas, weights, lam, normalize, vote)
        else:
            merged = combine(torch.zeros_like(block), deltas, weights, 1.0, normalize, vote)
            out[rows] = torch.add(block, merged.mul_(mask(raw, merged, p)), alpha=lam)
    return out.reshape(base.shape)
