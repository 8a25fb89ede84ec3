"""NearSwap: move the base toward the model only where the two are close (mergekit
``nearswap``; no paper: alchemonaut's QuartetAnemoi model card).

Per entry, w = clamp(t / max(|W0 - W1|, 1e-6), 0, 1) and the result is w W1 + (1 - w) W0:
entries that differ by at most t take the model's value, larger differences move by t.
"""

from __future__ import annotations

from typing import Any

import torch

from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register


def nearswap(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    a, b = base.float(), inputs[0].float()
    w = (p.shared["t"] / (a - b).abs_().clamp_(min=1e-6)).clamp_(0.0, 1.0)
    return torch.lerp(a, b, w)


def _t_given(recipe: Any) -> list[str]:
    given = "t" in recipe.params or any("t" in o.params for o in recipe.overrides)
    return [] if given else ["params.t: nearswap needs t (it has no default, as in mergekit)"]


register(
    Method(
        name="nearswap",
        fn=nearswap,
        params=(Param("t", None, "distance below which the model's value is taken", low=0.0),),
        summary="take the model's value where it is within t of the base, else move by t",
        paper="mergekit nearswap (QuartetAnemoi-70B model card)",
        max_models=1,
        check_recipe=_t_given,
    )
)
