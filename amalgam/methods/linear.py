"""Weighted average of weights (model soups, arXiv 2203.05482)."""

from __future__ import annotations

import torch

from amalgam.methods.accumulate import WeightedSum
from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.kernels import merge as fused
from amalgam.methods.sparsify import as_rows, row_chunks
from amalgam.methods.task_vectors import normalize_param


def linear(
    base: torch.Tensor | None, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    """sum_i w_i W_i, divided by sum_i w_i when normalizing (uniform soup by default); with
    every weight zero, the plain mean. Accumulates in float32, block by block (on CPU in one
    fused kernel pass, ``kernels.merge``, with the same bytes, stored in ``ctx.out_dtype``)."""
    weights, total = soup_weights(p)
    if inputs[0].device.type == "cpu":
        fast = fused.linear(inputs, weights, total, ctx.out_dtype)
        if fast is not None:
            return fast
    xs = [as_rows(x) for x in inputs]
    out = torch.empty(xs[0].shape, dtype=torch.float32, device=xs[0].device)
    for rows in row_chunks(*out.shape):
        block = out[rows]
        block.zero_()
        for x, w in zip(xs, weights, strict=True):
            block.add_(x[rows], alpha=w)
        if total is not None:
            block /= total
    return out.reshape(inputs[0].shape)


def soup_weights(p: TensorParams) -> tuple[list[float], float | None]:
    """The models' weights, and their sum when normalizing (else None); with every weight
    zero, the plain mean's."""
    weights = p.each("weight")
    if not p.shared["normalize"]:
        return weights, None
    total = sum(weights)
    if abs(total) <= 1e-8:
        weights, total = [1.0] * len(weights), float(len(weights))  # all zero: the plain mean
    return weights, total


def linear_sum(base: torch.Tensor | None, p: TensorParams, ctx: MergeContext) -> WeightedSum:
    """``linear`` one model at a time (the engine's memory budget)."""
    return WeightedSum(*soup_weights(p))


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
        accumulate=linear_sum,
    )
)
