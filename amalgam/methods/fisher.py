"""Fisher-weighted averaging with diagonal Fisher information (arXiv 2111.09832)."""

from __future__ import annotations

from typing import Any

import torch

from amalgam.errors import MergeError
from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.needs import DataStatistics
from amalgam.methods.params import recipe_wide
from amalgam.statistics.settings import DEFAULT_SAMPLES, VARIANTS

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
    return "fisher", {"samples": int(shared["samples"]), "fisher": shared["fisher"]}


register(
    Method(
        name="fisher",
        fn=fisher_merge,
        params=(
            Param("weight", 1.0, "coefficient of this model", per_model=True, low=0.0),
            Param("epsilon", 1e-6, "added to every Fisher entry (floor)", low=0.0),
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
                "sampled",
                "targets: sampled from the model (the paper's Fisher) or the data's (empirical)",
                kind=str,
                choices=VARIANTS,
                gradient=False,
            ),
        ),
        summary="element-wise average weighted by each model's diagonal Fisher on its data",
        paper="arXiv 2111.09832",
        needs_base=False,
        check_recipe=recipe_wide(("samples", "fisher")),
        needs=(DataStatistics(fisher_statistics),),
    )
)
