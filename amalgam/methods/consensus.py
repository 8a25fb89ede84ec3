"""Consensus merging: keep the entries that at least k TALL masks select (arXiv 2405.07813).

Per entry, with raw task vectors t_i = W_i - W0 and the merged task vector tau (task
arithmetic's weighted sum, or TIES' output, before the lambda scale), task i's TALL mask is
m_i = [|t_i| > mask_lambda_i * |tau - t_i|] (strict), and
W = W0 + lambda * [sum_i m_i >= agreement] * tau.
agreement 2 drops weights used by one task ("selfish") or none ("catastrophic"), 1 only the
latter, 0 gives the base merge. Every step is elementwise, so the per-tensor computation equals
the paper's whole-model one (for ``consensus_ties`` with ``trim: model`` as well).
The authors choose each task's mask_lambda in {0.2, ..., 0.6} on that task's validation data;
the default here is one value, 0.6 (FusionBench's default). As in the authors' code, the TIES
base merge sums the agreeing entries (``normalize: false``, their ``dis-sum``) and masks are
built against that same vector.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from amalgam.methods.base import Method, Param, TensorParams, register
from amalgam.methods.sparsify import at_least
from amalgam.methods.task_vectors import (
    CONSENSUS,
    DENSITY,
    LAMBDA,
    WEIGHT,
    normalize_param,
    task_vector_merge,
)
from amalgam.methods.ties import MODEL_TRIM, TRIM, check_model_trim, trim

MASK_LAMBDA = Param(
    "mask_lambda",
    0.6,
    "TALL mask threshold: keep where |t_i| > mask_lambda * |tau - t_i|",
    per_model=True,
    low=0.0,
)
AGREEMENT = Param(
    "agreement",
    2,
    "entries are kept where at least this many TALL masks select them (the paper's k)",
    kind=int,
    low=0,
    gradient=False,
)


def tall_mask(task: torch.Tensor, merged: torch.Tensor, mask_lambda: float) -> torch.Tensor:
    """One task's TALL mask, as bools: |task| > mask_lambda * |merged - task| (the inputs are
    left unchanged; two temporaries of their size)."""
    return task.abs() > torch.sub(merged, task).abs_().mul_(mask_lambda)


def consensus_mask(raw: list[torch.Tensor], merged: torch.Tensor, p: TensorParams) -> torch.Tensor:
    """1.0 where at least ``agreement`` of the models' TALL masks select the entry, else 0.0."""
    count = torch.zeros_like(merged)
    for t, lam in zip(raw, p.each("mask_lambda"), strict=True):
        count.add_(tall_mask(t, merged, lam))
    return at_least(count, p.shared["agreement"])


def check_agreement(recipe: Any) -> list[str]:
    """``agreement`` counts models: a whole number."""
    places = [("params", recipe.params)] + [
        (f"overrides[{j}].params", o.params) for j, o in enumerate(recipe.overrides)
    ]
    return [
        f"{where}.agreement: must be a whole number of models, got {values['agreement']!r}"
        for where, values in places
        if isinstance(values.get("agreement"), float) and not values["agreement"].is_integer()
    ]


def check_consensus_ties(recipe: Any) -> list[str]:
    return check_agreement(recipe) + check_model_trim(recipe)


register(
    Method(
        name="consensus_ta",
        fn=partial(task_vector_merge, None, False, mask=consensus_mask),
        params=(WEIGHT, LAMBDA, normalize_param(False), MASK_LAMBDA, AGREEMENT),
        summary="task arithmetic restricted to entries at least k TALL masks agree on",
        paper="arXiv 2405.07813",
        check_recipe=check_agreement,
    )
)
register(
    Method(
        name="consensus_ties",
        fn=partial(task_vector_merge, trim, True, mask=consensus_mask),
        params=(
            WEIGHT,
            DENSITY,
            LAMBDA,
            normalize_param(False),
            CONSENSUS,
            TRIM,
            MASK_LAMBDA,
            AGREEMENT,
        ),
        summary="TIES (agreeing entries summed), restricted to entries k TALL masks agree on",
        paper="arXiv 2405.07813",
        check_recipe=check_consensus_ties,
        needs=(MODEL_TRIM,),
    )
)
