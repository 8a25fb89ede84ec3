"""Passthrough: the single input's tensor, optionally scaled (mergekit ``passthrough``).

With ``slices`` (amalgam/slices.py) the single input is the stacked model, so a passthrough
merge is a frankenmerge or a layer swap. ``scale`` is shared (mergekit's is per model, but with
one input per tensor the two are the same); scale it per tensor with overrides or gradients.
"""

from __future__ import annotations

import torch

from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register


def passthrough(
    base: torch.Tensor | None, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    return inputs[0].float() * p.shared["scale"]


register(
    Method(
        name="passthrough",
        fn=passthrough,
        params=(Param("scale", 1.0, "factor applied to the tensor"),),
        summary="copy one model's tensors (with slices: a stacked or layer-swapped model)",
        paper="mergekit passthrough; layer swapping arXiv 2410.01335",
        needs_base=False,
        max_models=1,
    )
)
