"""Weighted average of weights (model soups, arXiv 2203.05482)."""

from __future__ import annotations

import torch

from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.sparsify import as_rows, row_chunks
from amalgam.methods.task_vectors import normalize_param


def linear(
    base: torch.Tensor | None, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    """sum_i w_i W_i, divided by sum_i w_i when normalizing (uniform soup by default); with
    every weight zero, the plain mean. Accumulates in float32, block by block (on CPU in one
    fused kernel pass, ``kernels.merge``, with the same bytes)."""
    weights = p.each("weight")
    total = sum(weights)
    if p.shared["normalize"] and abs(total) <= 1e-8:
        weights, total = [1.0] * len(inputs), float(len(inputs))  # all zero: the plain mean
    if inputs[0].device.type == "cpu":
        from amalgam.methods.kernels import merge as fused

        fast = fused.linear(inputs, weights, p.shared["normalize"], total)
        if fast is not None:
            return fast
    xs = [as_rows(x) for x in inputs]
    out = torch.empty(xs[0].shape, dtype=torch.float32, device=xs[0].device)
    for rows in row_chunks(*out.shape):
        block = out[rows]
        block.zero_()
        for x, w in zip(xs, weights, strict=True):
            block.add_(x[rows], alpha=w)
        if p.shared["normalize"]:
            block /= total
    return out.reshape(inputs[0].shape)


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
