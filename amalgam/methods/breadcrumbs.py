"""Model Breadcrumbs: drop magnitude outliers and small entries of task vectors (arXiv 2312.06795).

Ranking is per tensor by default (mergekit); ``granularity: row`` ranks each row as the
paper's code does. Exactly floor(gamma * n) outliers are removed (ties broken by index);
unlike mergekit, a tensor too small for one outlier keeps its band.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from amalgam.methods.accumulate import TaskVectorSum
from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.sparsify import band_mask
from amalgam.methods.task_vectors import (
    CONSENSUS,
    LAMBDA,
    WEIGHT,
    Applier,
    normalize_param,
    task_vector_merge,
)

PARAMS = (
    WEIGHT,
    Param(
        "density",
        0.15,
        "fraction kept below the outliers (paper's beta)",
        per_model=True,
        low=0.0,
        high=1.0,
        low_open=True,
    ),
    Param(
        "gamma",
        0.006,
        "fraction of largest-magnitude outliers removed",
        per_model=True,
        low=0.0,
        high=1.0,
    ),
    LAMBDA,
    Param(
        "granularity",
        "tensor",
        "rank whole tensors or each row",
        kind=str,
        choices=("tensor", "row"),
        gradient=False,
    ),
)


def band(delta: Callable[[], torch.Tensor], i: int, p: TensorParams, ctx: MergeContext) -> Applier:
    m = p.per_model[i]
    mask = band_mask(delta(), m["density"], m["gamma"], p.shared["granularity"] == "row")
    return lambda chunk, rows: chunk * mask[rows]


register(
    Method(
        name="breadcrumbs",
        fn=partial(task_vector_merge, band, False),
        accumulate=partial(TaskVectorSum, band, False),
        params=(*PARAMS, normalize_param(False)),
        summary="keep the band of task-vector entries below the top-gamma outliers, then sum",
        paper="arXiv 2312.06795",
    )
)
register(
    Method(
        name="breadcrumbs_ties",
        fn=partial(task_vector_merge, band, True),
        params=(*PARAMS, normalize_param(True), CONSENSUS),
        summary="Breadcrumbs band, then TIES sign election and disjoint merge",
        paper="arXiv 2312.06795",
    )
)
