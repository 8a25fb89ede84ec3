"""mergekit's ``slices:`` section read as the models it names, their parameters and amalgam's
``slices`` (used by :mod:`amalgam.mergekit_compat`; docs/slices.md).

Each slice lists ``sources`` (``model``, ``layer_range: [start, end]``, optional
``parameters``). A source's parameters are its model's (mergekit asks them first): a model
must carry the same ones wherever it appears. A slice's ``parameters`` sit between the
sources' and the top-level ones in mergekit's lookup; with one slice they are the top level's,
its entries tried first. A gradient restarts in every slice, in mergekit and in amalgam
(:func:`amalgam.methods.params.layer_fraction`). Refused, each with the field named: a slice's
own ``base_model`` or ``residual_weight``; ``parameters`` on a slice when there are several; a
model listed twice in one slice; a model whose parameters differ between slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from amalgam.errors import RecipeError


class Refuse(Protocol):
    def __call__(self, where: str, message: str) -> RecipeError: ...


@dataclass(frozen=True)
class Source:
    """One source of a slice: a model path, its layer range and its parameters."""

    path: str
    start: int
    end: int
    where: str
    parameters: dict[str, Any] = field(default_factory=dict)


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
            if key not in ("sources", "parameters"):
                raise refuse(f"{where}.{key}", "not supported")
        if piece.get("parameters") and len(slices) > 1:
            raise refuse(
                f"{where}.parameters",
                "per-slice parameters of several slices are not supported: set them at the "
                "top level or on the sources",
            )
        sources: list[Source] = []
        for j, src in enumerate(piece["sources"]):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or set(src) - {"model", "layer_range", "parameters"}:
                raise refuse(at, "expected {model: PATH, layer_range: [start, end]}")
            path, span = src.get("model"), src.get("layer_range")
            if not isinstance(path, str) or not path.strip():
                raise refuse(f"{at}.model", f"expected a model path, got {path!r}")
            if (
                not isinstance(span, list)
                or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
            ):
                raise refuse(f"{at}.layer_range", f"expected [start, end], got {span!r}")
            if any(path == s.path for s in sources):
                raise refuse(f"{at}.model", f"{path!r} is listed twice in this slice")
            sources.append(Source(path, span[0], span[1], at, src.get("parameters") or {}))
        out.append(sources)
    return out


def model_entries(slices: list[list[Source]], refuse: Refuse) -> tuple[list[dict], list[str]]:
    """The models the slices read, in order of first use, as mergekit ``models`` entries with
    their sources' parameters; and where each entry's parameters were given."""
    first: dict[str, Source] = {}
    for piece in slices:
        for src in piece:
            seen = first.setdefault(src.path, src)
            if seen.parameters != src.parameters:
                raise refuse(
                    f"{src.where}.parameters",
                    f"differs from {seen.where}.parameters: amalgam sets a model's parameters "
                    "once for the whole merge",
                )
    entries = [{"model": p, "parameters": s.parameters} for p, s in first.items()]
    return entries, [s.where for s in first.values()]


def top_parameters(data: dict) -> dict[str, Any]:
    """The top-level parameters, with a single slice's ``parameters`` tried first."""
    top = dict(data.get("parameters") or {})
    own = data["slices"][0].get("parameters") or {}
    if not isinstance(own, dict) or not isinstance(top, dict):
        return own or top  # not a mapping: refused where it is read
    for key, value in own.items():
        top[key] = _entries(value) + _entries(top[key]) if key in top else value
    return top


def _entries(value: Any) -> list[Any]:
    """A setting as a list of ``{filter, value}`` entries (a plain value: one catch-all)."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return list(value)
    return [{"value": value}]


def recipe_slices(slices: list[list[Source]], labels: dict[str, str]) -> list[dict[str, Any]]:
    """amalgam's ``slices``: each source named by its input's label (``labels``: path ->
    label, ``base`` for the base)."""
    return [
        {"sources": [{"model": labels[s.path], "layers": [s.start, s.end]} for s in piece]}
        for piece in slices
    ]
