"""DARE: random drop and rescale of task vectors (arXiv 2311.03099), linear and TIES variants."""

from __future__ import annotations

from functools import partial

from amalgam.methods.accumulate import TaskVectorSum
from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.kernels import merge as fused
from amalgam.methods.sparsify import RandomDrop
from amalgam.methods.task_vectors import (
    CONSENSUS,
    LAMBDA,
    WEIGHT,
    Applier,
    TaskVector,
    normalize_param,
    task_vector_merge,
)

KEEP = Param(
    "density",
    0.1,
    "keep probability 1 - p (paper: p = 0.9)",
    per_model=True,
    low=0.0,
    high=1.0,
    low_open=True,
)
RESCALE = Param(
    "rescale",
    "exact",
    "exact 1/(1-p) (paper), l1 norm match (mergekit), or none",
    kind=str,
    choices=("exact", "l1", "none"),
    gradient=False,
)


def drop(delta: TaskVector, i: int, p: TensorParams, ctx: MergeContext) -> Applier:
    dropper = RandomDrop(p.per_model[i]["density"], ctx.random_key(i), p.shared["rescale"])
    if dropper.needs_fit:
        norms = fused.drop_norms(delta.x, delta.base, dropper)
        if norms is None:
            dropper.fit(delta())
        else:
            dropper.fit_norms(*norms)
    return dropper.apply


register(
    Method(
        name="dare_linear",
        fn=partial(task_vector_merge, drop, False),
        accumulate=partial(TaskVectorSum, drop, False),
        params=(WEIGHT, KEEP, LAMBDA, normalize_param(False), RESCALE),
        summary="drop task-vector entries at random (keep density), rescale, then task arithmetic",
        paper="arXiv 2311.03099",
    )
)
register(
    Method(
        name="dare_ties",
        fn=partial(task_vector_merge, drop, True),
        accumulate=partial(TaskVectorSum, drop, True),
        params=(WEIGHT, KEEP, LAMBDA, normalize_param(False), RESCALE, CONSENSUS),
        summary="DARE drop and rescale, then TIES sign election and disjoint merge",
        paper="arXiv 2311.03099",
    )
)
