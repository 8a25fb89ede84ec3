"""Fisher-weighted averaging with diagonal Fisher information (arXiv 2111.09832)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from amalgam.errors import MergeError
from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.needs import DataStatistics
from amalgam.methods.params import recipe_wide
from amalgam.statistics.artifact import StatisticsInfo
from amalgam.statistics.settings import (
    DEFAULT_DRAWS,
    DEFAULT_SAMPLES,
    DEFAULT_VARIANT,
    VARIANTS,
    settings_for,
)

log = logging.getLogger(__name__)
EPSILON = 1e-6
#: epsilon above this share of a model's root-mean-square Fisher entry swamps its Fisher
EPSILON_SHARE = 1e-2

SAMPLES = Param(
    "samples", DEFAULT_SAMPLES, "examples of each model's data used for its statistics",
    kind=int, low=1, gradient=False,
)  # fmt: skip


def model_weights(p: TensorParams) -> list[float]:
    """The per-model ``weight`` values; all zero means equal weights (the plain mean)."""
    weights = [float(w) for w in p.each("weight")]
    return weights if any(weights) else [1.0] * len(weights)


def fisher_merge(
    base: torch.Tensor | None, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    """sum_i c_i (F_i + eps) W_i / sum_i c_i (F_i + eps), element-wise, in float32.

    c_i is the model's ``weight``; with ``normalize`` it is also divided by the L2 norm of the
    model's whole Fisher (c_i = w_i / ||F_i|| / sum_j 1/||F_j||, the PyTorch ports' form of the
    paper's per-model normalisation), so a model whose Fisher is larger overall does not win
    everywhere. ``epsilon`` is added to every Fisher (the ports' floor). Where every c_i F_i is
    zero and epsilon is 0, the entry is the c-weighted average. The base is not used.
    """
    weights = model_weights(p)
    if p.shared["normalize"]:
        norms = [s.norm for s in ctx.statistics]
        zero = [s.uri for s, n in zip(ctx.statistics, norms, strict=True) if n <= 0.0]
        if zero:
            raise MergeError(f"Fisher of {zero[0]} is zero everywhere: it cannot be normalised")
        inverse = [1.0 / n for n in norms]
        weights = [w * v / sum(inverse) for w, v in zip(weights, inverse, strict=True)]
    eps = float(p.shared["epsilon"])
    num = torch.zeros(inputs[0].shape, dtype=torch.float32, device=inputs[0].device)
    den = torch.zeros_like(num)
    for x, f, c in zip(inputs, ctx.model_stats, weights, strict=True):
        if f is None:
            raise MergeError(f"tensor '{ctx.name}': a model's Fisher artifact lacks it")
        cf = f.float().add(eps).mul_(c)
        den.add_(cf)
        num.addcmul_(cf, x.float())
    if bool((den > 0).all()):
        return num.div_(den)
    plain = sum(x.float() * c for x, c in zip(inputs, weights, strict=True)) / sum(weights)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), plain)


def fisher_statistics(shared: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "fisher", settings_for(
        "fisher", int(shared["samples"]), shared["fisher"], int(shared["draws"])
    )


def warn_large_epsilon(recipe: Any, infos: Sequence[StatisticsInfo]) -> None:
    """Log a warning naming each model whose root-mean-square Fisher entry is not large
    against ``epsilon`` (epsilon >= EPSILON_SHARE x it): epsilon, not its Fisher, then sets its
    weights (a one-draw sampled Fisher of a confident model is the usual cause)."""
    eps = float(recipe.params.get("epsilon", EPSILON))
    for m, info in zip(recipe.models, infos, strict=True):
        count = sum(math.prod(shape) for shape in info.shapes.values())
        rms = info.norm / math.sqrt(max(count, 1))
        if eps > 0 and eps >= EPSILON_SHARE * rms:
            log.warning(
                "fisher: epsilon %g is not small against the Fisher of model %s "
                "(root-mean-square entry %.3g, from %s): epsilon, not the Fisher, sets its "
                "weights; lower epsilon, or use fisher: exact or more draws",
                eps, m.label, rms, info.uri,
            )  # fmt: skip


register(
    Method(
        name="fisher",
        fn=fisher_merge,
        params=(
            Param("weight", 1.0, "coefficient of this model", per_model=True, low=0.0),
            Param("epsilon", EPSILON, "added to every Fisher entry (floor)", low=0.0),
            Param(
                "normalize",
                True,
                "divide each Fisher by its whole-model L2 norm",
                kind=bool,
                gradient=False,
            ),
            SAMPLES,
            Param(
                "fisher",
                DEFAULT_VARIANT,
                "exact: expectation over the model's predictive distribution (the paper's); "
                "sampled: draws from it; empirical: the data's own tokens",
                kind=str,
                choices=VARIANTS,
                gradient=False,
            ),
            Param(
                "draws",
                DEFAULT_DRAWS,
                "label draws per example (fisher: sampled)",
                kind=int,
                low=1,
                gradient=False,
            ),
        ),
        summary="element-wise average weighted by each model's diagonal Fisher on its data",
        paper="arXiv 2111.09832",
        needs_base=False,
        check_recipe=recipe_wide(("samples", "fisher", "draws")),
        needs=(DataStatistics(fisher_statistics, check=warn_large_epsilon),),
    )
)
