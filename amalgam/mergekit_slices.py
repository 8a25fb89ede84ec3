"""mergekit's ``slices:`` section read as the models it names and amalgam's ``slices``
(used by :mod:`amalgam.mergekit_compat`; docs/slices.md).

Each slice lists ``sources`` (``model``, ``layer_range: [start, end]``). Refused, each with the
field named: a slice's own ``base_model``, ``parameters`` or ``residual_weight`` and a source's
``parameters`` (amalgam sets parameters recipe-wide); a model listed twice in one slice; and,
with more than one slice, gradient (list) parameter values, since mergekit restarts a gradient
in every slice while amalgam interpolates it across the whole output.
"""

from __future__ import annotations

from typing import Any, Protocol

from amalgam.errors import RecipeError

# (model path, start, end): one source of a slice
Source = tuple[str, int, int]


class Refuse(Protocol):
    def __call__(self, where: str, message: str) -> RecipeError: ...


def slice_sources(data: dict, refuse: Refuse) -> list[list[Source]]:
    """Each slice's sources, checked."""
    slices = data["slices"]
    if "models" in data:
        raise refuse("slices", "give models or slices, not both")
    if not isinstance(slices, list) or not slices:
        raise refuse("slices", "expected a non-empty list of '- sources: [...]' entries")
    out: list[list[Source]] = []
    for i, piece in enumerate(slices):
        where = f"slices[{i}]"
        if not isinstance(piece, dict) or not isinstance(piece.get("sources"), list):
            raise refuse(where, "expected a mapping with a list of 'sources'")
        for key in piece:
            if key != "sources":
                raise refuse(f"{where}.{key}", "not supported: set parameters at the top level")
        sources: list[Source] = []
        for j, src in enumerate(piece["sources"]):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or set(src) - {"model", "layer_range", "parameters"}:
                raise refuse(at, "expected {model: PATH, layer_range: [start, end]}")
            if src.get("parameters"):
                raise refuse(f"{at}.parameters", "not supported: set parameters at the top level")
            path, span = src.get("model"), src.get("layer_range")
            if not isinstance(path, str) or not path.strip():
                raise refuse(f"{at}.model", f"expected a model path, got {path!r}")
            if (
                not isinstance(span, list)
                or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
            ):
                raise refuse(f"{at}.layer_range", f"expected [start, end], got {span!r}")
            if any(path == s[0] for s in sources):
                raise refuse(f"{at}.model", f"{path!r} is listed twice in this slice")
            sources.append((path, span[0], span[1]))
        out.append(sources)
    if len(out) > 1 and _has_gradient(data.get("parameters")):
        raise refuse(
            "parameters",
            "a gradient (list value) restarts in each slice in mergekit, amalgam interpolates "
            "it across the whole output: use one slice or scalar values",
        )
    return out


def _has_gradient(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_gradient(v) for v in value.values())
    if isinstance(value, list):
        return any(isinstance(v, list | dict) or _has_gradient(v) for v in value) or (
            bool(value) and all(isinstance(v, int | float) for v in value)
        )
    return False


def model_entries(slices: list[list[Source]]) -> list[dict[str, str]]:
    """The models the slices read, in order of first use, as mergekit ``models`` entries."""
    paths = dict.fromkeys(path for piece in slices for path, _, _ in piece)
    return [{"model": path} for path in paths]


def recipe_slices(slices: list[list[Source]], labels: dict[str, str]) -> list[dict[str, Any]]:
    """amalgam's ``slices``: each source named by its input's label (``labels``: path ->
    label, ``base`` for the base)."""
    return [
        {"sources": [{"model": labels[path], "layers": [a, b]} for path, a, b in piece]}
        for piece in slices
    ]
