"""Call a data-driven merge method through a validated recipe, its statistics given directly."""

from __future__ import annotations

from typing import Any

import torch

from amalgam.methods.base import MergeContext, get_method
from amalgam.methods.params import resolve_params
from amalgam.recipe import parse_recipe
from amalgam.statistics.artifact import StatisticsInfo


def info(norm: float, uri: str = "a.safetensors") -> StatisticsInfo:
    return StatisticsInfo(uri, "fisher", "m", "d", 1, 1, norm, {}, "h", {})


def run(
    method: str,
    inputs: list[torch.Tensor],
    stats: list[torch.Tensor | None],
    params: dict[str, Any] | None = None,
    weights: list[float] | None = None,
    norms: list[float] | None = None,
) -> torch.Tensor:
    """Call a data-driven method through a validated recipe, statistics given directly."""
    models = [
        {"uri": f"m{i}", "data": f"d{i}.jsonl", "params": {} if weights is None else {"weight": w}}
        for i, w in enumerate(weights or [None] * len(inputs))
    ]
    recipe = parse_recipe({"method": method, "models": models, "params": params or {}})
    spec = get_method(method)
    ctx = MergeContext(
        "w",
        statistics=tuple(info(n) for n in (norms or [1.0] * len(inputs))),
        model_stats=tuple(stats),
    )
    before = [x.clone() for x in inputs]
    out = spec.fn(None, inputs, resolve_params(recipe, spec, "w", 1), ctx)
    assert all(torch.equal(a, b) for a, b in zip(inputs, before, strict=True))
    return out
