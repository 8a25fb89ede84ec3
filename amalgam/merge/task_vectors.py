"""The shared machinery of task-vector methods: deltas, sign election, disjoint or plain sums.

One function, ``combine``, serves task arithmetic, TIES, DARE and Breadcrumbs (and their
sign-consensus variants): each method only chooses how task vectors are sparsified.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from amalgam.merge.base import MergeContext, Param, TensorParams

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


def elect_sign(weighted: torch.Tensor, consensus: str = "sum") -> torch.Tensor:
    """Elected sign per entry (+1 or -1) from stacked weighted deltas; a zero vote elects +1."""
    votes = weighted.sum(0) if consensus == "sum" else weighted.sign().sum(0)
    return torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)


def combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    lam: float,
    normalize: bool,
    consensus: str | None = None,
) -> torch.Tensor:
    """base + lam * (sum_i w_i d_i [agreeing with the elected sign]) / (sum of those w_i).

    With ``consensus`` set, only entries whose sign matches the elected sign count (TIES'
    disjoint merge); exact zeros never count. A divisor below 1e-8 is replaced by 1.
    """
    w = torch.tensor(weights, dtype=deltas[0].dtype, device=deltas[0].device)
    shape = (-1,) + (1,) * deltas[0].dim()
    weighted = torch.stack(deltas) * w.view(shape)
    if consensus is None:
        mixed = weighted.sum(0)
        divisor = w.sum() if normalize else None
    else:
        agree = weighted.sign() == elect_sign(weighted, consensus)
        mixed = (weighted * agree).sum(0)
        divisor = (w.view(shape) * agree).sum(0) if normalize else None
    if divisor is not None:
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
        mixed = mixed / divisor
    return base + lam * mixed


Sparsifier = Callable[[torch.Tensor, int, TensorParams, MergeContext], torch.Tensor]


def task_vector_merge(
    sparsify: Sparsifier | None,
    consensus: bool,
    base: torch.Tensor,
    inputs: list[torch.Tensor],
    p: TensorParams,
    ctx: MergeContext,
) -> torch.Tensor:
    """Deltas against ``base``, each sparsified with its model's params, then ``combine``d."""
    deltas = [x - base for x in inputs]
    if sparsify is not None:
        deltas = [sparsify(d, i, p, ctx) for i, d in enumerate(deltas)]
    return combine(
        base,
        deltas,
        p.each("weight"),
        p.shared["lambda"],
        p.shared["normalize"],
        p.shared["consensus"] if consensus else None,
    )
