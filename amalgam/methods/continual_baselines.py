"""Continual baselines: running average, task arithmetic and TIES, one model at a time.

Each absorbs one model into the running merge (DESIGN shape 2); the engine keeps the merge as a
checkpoint plus a small JSON state (``amalgam.engine.continual``). They follow the continual
baselines of OPCM (arXiv 2501.09522) as its public code runs them:

- ``continual_avg``: M_t = M_{t-1} + (W_t - M_{t-1}) / t, the running mean of the absorbed
  models (M_1 = W_1; the base only anchors the state).
- ``continual_ta``: M_t = M_{t-1} + lambda * (W_t - W0), so M_t = W0 + lambda * sum of task
  vectors (M_0 = W0; lambda = 0.3 as in that code).
- ``continual_ties``: M_1 = W0 + lambda * tau_1; after that
  M_t = M_{t-1} + lambda * TIES(M_{t-1} - W0, tau_t): both are trimmed to their top ``density``
  entries, a sign is elected by summed mass, and agreeing entries are summed (``merge: sum``, as
  that code) or averaged (``merge: mean``). The trim is per tensor (that code trims the whole
  flattened model) and a zero vote elects +1 (that code takes the majority sign instead; either
  way nothing agrees there, so the entry adds 0).
"""

from __future__ import annotations

from typing import Any

import torch

from amalgam.methods.base import (
    STEP_KEY,
    MergeContext,
    MergeFn,
    Method,
    Param,
    Step,
    TensorParams,
    register,
)
from amalgam.methods.needs import RunningState
from amalgam.methods.sparsify import trim_magnitude
from amalgam.methods.task_vectors import combine


def step_of(ctx: MergeContext) -> Step:
    """The step being absorbed (set by the continual engine)."""
    return ctx.stats[STEP_KEY]


def continual_avg(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    new = inputs[-1].float()
    if len(inputs) == 1:
        return new.clone()
    return torch.lerp(inputs[0].float(), new, 1.0 / step_of(ctx).index)


def continual_ta(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    b = base.float()
    merged = inputs[0].float() if len(inputs) == 2 else b
    return torch.add(merged, torch.sub(inputs[-1].float(), b), alpha=p.shared["lambda"])


def continual_ties(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    b = base.float()
    tau = torch.sub(inputs[-1].float(), b)
    lam = p.shared["lambda"]
    if len(inputs) == 1:
        return torch.add(b, tau, alpha=lam)
    merged = inputs[0].float()
    density = p.shared["density"]
    deltas = [trim_magnitude(torch.sub(merged, b), density), trim_magnitude(tau, density)]
    return combine(merged, deltas, [1.0, 1.0], lam, p.shared["merge"] == "mean", "sum")


def check_continual(recipe: Any) -> list[str]:
    """Continual recipes take shared parameters only (they are recorded in the state)."""
    problems = []
    if recipe.overrides:
        problems.append(f"overrides: '{recipe.method}' takes no per-tensor overrides")
    if recipe.files_from not in (None, "base"):
        problems.append(f"files_from: '{recipe.method}' copies config and tokenizer from the base")
    return problems


def continual(
    name: str,
    fn: MergeFn,
    params: tuple[Param, ...],
    summary: str,
    unscaled: MergeFn | None = None,
    gpu_bound: bool = False,
) -> Method:
    """Register a continual method (a base is required; shared parameters only); ``unscaled``:
    see ``RunningState``; ``gpu_bound``: see ``Method``."""
    return register(
        Method(
            name=name,
            fn=fn,
            params=params,
            summary=summary,
            paper="arXiv 2501.09522",
            check_recipe=check_continual,
            needs=(RunningState(unscaled),),
            gpu_bound=gpu_bound,
        )
    )


def scale_param(default: float) -> Param:
    return Param("lambda", default, "scale of each absorbed task vector")


continual("continual_avg", continual_avg, (), "running mean of the absorbed models, one at a time")
continual(
    "continual_ta",
    continual_ta,
    (scale_param(0.3),),
    "merged += lambda * (W_t - W0), one model at a time",
)
continual(
    "continual_ties",
    continual_ties,
    (
        Param(
            "density",
            0.2,
            "fraction of entries kept",
            low=0.0,
            high=1.0,
            low_open=True,
        ),
        scale_param(0.5),
        Param(
            "merge",
            "sum",
            "agreeing entries: summed or averaged",
            kind=str,
            choices=("sum", "mean"),
            gradient=False,
        ),
    ),
    "merged += lambda * TIES(merged - W0, W_t - W0), one model at a time",
)
