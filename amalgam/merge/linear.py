"""Weighted average of weights (model soups, arXiv 2203.05482)."""

from __future__ import annotations

import torch

from amalgam.merge.base import MergeContext, Method, Param, TensorParams, register
from amalgam.merge.task_vectors import normalize_param


def linear(
    base: torch.Tensor | None, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    """sum_i w_i W_i, divided by sum_i w_i when normalizing (uniform soup by default); with
    every weight zero, the plain mean."""
    out = torch.zeros_like(inputs[0])
    for x, w in zip(inputs, p.each("weight"), strict=True):
        out.add_(x, alpha=w)
    if not p.shared["normalize"]:
        return out
    total = sum(p.each("weight"))
    if abs(total) > 1e-8:
        return out / total
    return torch.stack(inputs).mean(0)  # all weights zero: the plain mean


register(
    Method(
        name="linear",
        fn=linear,
        params=(
            Param("weight", 1.0, "weight of this model in the average", per_model=True, low=0.0),
            normalize_param(True),
        ),
        summary="weighted average of the models' weights (uniform soup by default); base unused",
        paper="arXiv 2203.05482",
        needs_base=False,
    )
)
