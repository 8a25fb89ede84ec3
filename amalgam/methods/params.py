"""Resolve a recipe's parameter values for one tensor: overrides by regex, gradients by layer."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from amalgam.methods.base import Method, TensorParams

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
    x = 0.0 if layer is None else (layer / (num_layers - 1) if num_layers > 1 else 1.0)
    return at_fraction(value, x)


def at_fraction(value: Any, x: float) -> Any:
    """A gradient (list value) at position ``x`` in [0, 1]; any other value as it is."""
    if not isinstance(value, list):
        return value
    if len(value) == 1:
        return float(value[0])
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

    x = layer_fraction(recipe, layer, num_layers)

    def at_layer(values: dict[str, Any]) -> dict[str, Any]:
        return {k: at_fraction(v, x) for k, v in values.items()}

    return TensorParams(at_layer(shared), tuple(at_layer(v) for v in per_model))


def layer_fraction(recipe: Any, layer: int | None, num_layers: int) -> float:
    """Where output layer ``layer`` sits for a gradient: layer / (num_layers - 1), or, with
    ``slices``, k / (L - 1) for the k-th of the L layers of its slice (1 for a slice of one
    layer), as mergekit restarts a gradient in every slice. Tensors outside the layers: 0."""
    if layer is None:
        return 0.0
    slices = getattr(recipe, "slices", None)
    if slices:
        start = 0
        for piece in slices:
            length = piece.sources[0].layers[1] - piece.sources[0].layers[0]
            if layer < start + length:
                return (layer - start) / (length - 1) if length > 1 else 1.0
            start += length
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def recipe_wide(names: tuple[str, ...], when: tuple[str, str] | None = None) -> Callable:
    """A ``check_recipe`` for parameters that take one value for the whole recipe (read by a
    whole-model or data pass): no layer gradient, no per-tensor override. ``when``: only while
    the shared parameter ``when[0]`` has the value ``when[1]`` (``("trim", "model")``)."""
    because = f" with {when[0]}: {when[1]}" if when else ""

    def check(recipe: Any) -> list[str]:
        if when is not None and recipe.params.get(when[0]) != when[1]:
            return []
        places = [("params", recipe.params)] + [
            (f"models[{i}].params", m.params) for i, m in enumerate(recipe.models)
        ]
        for j, o in enumerate(recipe.overrides):
            places.append((f"overrides[{j}].params", o.params))
            places += [(f"overrides[{j}].models.{k}", v) for k, v in o.models.items()]
        problems = []
        for where, values in places:
            for name in names:
                if name not in values:
                    continue
                if where.startswith("overrides"):
                    problems.append(f"{where}.{name}: one value for the whole recipe{because}")
                elif isinstance(values[name], list):
                    problems.append(
                        f"{where}.{name}: one value for the whole recipe{because}, not a gradient"
                    )
        return problems

    return check
