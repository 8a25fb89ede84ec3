"""TIES-Merging: trim, elect sign, disjoint merge (arXiv 2306.01708).

Trim is per tensor by default (each tensor keeps its top ``density`` entries, as mergekit);
``trim: model`` keeps the top ``density`` of each model's whole task vector, as the paper's
code does, with an exact threshold found by a streaming two-pass radix selection
(``amalgam.merge.stats``). Ties with the threshold are kept. A zero vote elects +1.
"""

from __future__ import annotations

from functools import partial

import torch

from amalgam.merge.base import MergeContext, Method, Param, TensorParams, register
from amalgam.merge.sparsify import trim_magnitude
from amalgam.merge.stats import MagnitudeThreshold
from amalgam.merge.task_vectors import (
    CONSENSUS,
    DENSITY,
    LAMBDA,
    WEIGHT,
    normalize_param,
    task_vector_merge,
)

TRIM = Param(
    "trim",
    "tensor",
    "top-k scope: each tensor, or each model's whole task vector",
    kind=str,
    choices=("tensor", "model"),
    gradient=False,
)


def trim(delta: torch.Tensor, i: int, p: TensorParams, ctx: MergeContext) -> torch.Tensor:
    thresholds = ctx.stats.get(MagnitudeThreshold.key)
    return trim_magnitude(delta, p.per_model[i]["density"], thresholds and thresholds[i])


def model_trim_stats(p: TensorParams) -> list[MagnitudeThreshold]:
    """The whole-model magnitude thresholds that ``trim: model`` needs (model-level density)."""
    return [MagnitudeThreshold(p.each("density"))] if p.shared["trim"] == "model" else []


register(
    Method(
        name="ties",
        fn=partial(task_vector_merge, trim, True),
        params=(WEIGHT, DENSITY, LAMBDA, normalize_param(True), CONSENSUS, TRIM),
        summary="trim each task vector to its top-density entries, elect a sign, average agreeing",
        paper="arXiv 2306.01708",
        global_stats=model_trim_stats,
    )
)
