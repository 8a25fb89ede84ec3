"""Resolve a recipe's parameter values for one tensor: overrides by regex, gradients by layer."""

from __future__ import annotations

import re
from typing import Any

from amalgam.merge.base import Method, TensorParams

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The transformer block index in a tensor name (``model.layers.7.mlp...`` -> 7)."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def interpolate(value: Any, layer: int | None, num_layers: int) -> Any:
    """A list value is a gradient: piecewise-linear in layer / (num_layers - 1).

    Tensors outside the layer stack (embeddings, final norm, head) take the first value,
    as mergekit does.
    """
    if not isinstance(value, list):
        return value
    if len(value) == 1:
        return float(value[0])
    x = 0.0 if layer is None else (layer / (num_layers - 1) if num_layers > 1 else 1.0)
    s = min(max(x, 0.0), 1.0) * (len(value) - 1)
    i = int(s)
    j = min(i + 1, len(value) - 1)
    frac = s - i
    return float((1 - frac) * value[i] + frac * value[j])


def resolve_params(
    recipe: Any, method: Method, name: str | None, num_layers: int, use_overrides: bool = True
) -> TensorParams:
    """Parameter values for tensor ``name``; precedence, lowest first: method default,
    ``params``, the model's ``params``, then each matching override (shared, then per model)."""
    layer = layer_index(name) if name else None
    shared = {p.name: p.default for p in method.params}
    shared.update(recipe.params)
    per_model = [dict(shared, **m.params) for m in recipe.models]
    if use_overrides and name is not None:
        for o in recipe.overrides:
            if not re.search(o.match, name):
                continue
            shared.update(o.params)
            for m, values in zip(recipe.models, per_model, strict=True):
                values.update(o.params)
                values.update(o.models.get(m.label, {}))

    def at_layer(values: dict[str, Any]) -> dict[str, Any]:
        return {k: interpolate(v, layer, num_layers) for k, v in values.items()}

    return TensorParams(at_layer(shared), tuple(at_layer(v) for v in per_model))
