"""TIES-Merging: trim, elect sign, disjoint merge (arXiv 2306.01708).

Trim is per tensor by default (each tensor keeps its top ``density`` entries, as mergekit);
``trim: model`` keeps the top ``density`` of each model's whole task vector, as the paper's
code does, with an exact threshold found by a streaming two-pass radix selection
(``amalgam.methods.whole_model``); it keeps floor(density * P) entries plus ties (the paper's code
keeps one more). Ties with the threshold are kept. A zero vote elects +1.
"""

from __future__ import annotations

from functools import partial

from amalgam.methods.accumulate import TaskVectorSum
from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.needs import WholeModelStatistic
from amalgam.methods.params import recipe_wide
from amalgam.methods.sparsify import KeepAtLeast, delta_threshold
from amalgam.methods.task_vectors import (
    CONSENSUS,
    DENSITY,
    LAMBDA,
    WEIGHT,
    Applier,
    TaskVector,
    normalize_param,
    task_vector_merge,
)
from amalgam.methods.whole_model import MagnitudeThreshold

TRIM = Param(
    "trim",
    "tensor",
    "top-k scope: each tensor, or each model's whole task vector",
    kind=str,
    choices=("tensor", "model"),
    gradient=False,
)


def trim(delta: TaskVector, i: int, p: TensorParams, ctx: MergeContext) -> Applier:
    """Keep entries at or above this model's magnitude threshold (per tensor or whole model)."""
    thresholds = ctx.stats.get(MagnitudeThreshold.key)
    density = p.per_model[i]["density"]
    if thresholds is not None:
        return KeepAtLeast(thresholds[i])
    return KeepAtLeast(delta_threshold(delta.x, delta.base, density))


def model_trim_stats(p: TensorParams) -> list[MagnitudeThreshold]:
    """The whole-model magnitude thresholds that ``trim: model`` needs (model-level density)."""
    return [MagnitudeThreshold(p.each("density"))] if p.shared["trim"] == "model" else []


# ``trim: model`` takes one density per model, and a whole-model pass finds each threshold.
check_model_trim = recipe_wide(("density",), when=("trim", "model"))
MODEL_TRIM = WholeModelStatistic(model_trim_stats)

register(
    Method(
        name="ties",
        fn=partial(task_vector_merge, trim, True),
        accumulate=partial(TaskVectorSum, trim, True),
        params=(WEIGHT, DENSITY, LAMBDA, normalize_param(True), CONSENSUS, TRIM),
        summary="trim each task vector to its top-density entries, elect a sign, average agreeing",
        paper="arXiv 2306.01708",
        check_recipe=check_model_trim,
        needs=(MODEL_TRIM,),
    )
)
