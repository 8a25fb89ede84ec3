"""Where each output tensor comes from when the inputs' tensor sets differ: the one rule the
align check and the merge plan share, so ``amalgam run`` and ``amalgam merge`` accept and refuse
the same inputs.

The inputs come in order, the reference first (the base, else the first model):

- a tensor every input holds is merged; a non-float one (``position_ids``, an int buffer) is
  copied from the reference;
- a non-float buffer that the reference holds and some models lack is copied from the reference;
- any other tensor that some inputs hold and others lack (a float tensor, or a non-float one
  the reference lacks) follows ``extra_tensors``: ``error`` (the default) names the tensor and
  the models that hold and lack it; ``keep_from_first`` copies it unmerged from the first input
  that holds it; ``drop`` leaves it out of the output;
- shapes must agree, and a tensor is float in every input that holds it or in none.

With ``stepwise`` (continual methods absorb one model at a time into the running merge),
``keep_from_first`` is refused where a later step would merge a tensor an earlier step kept
unmerged from the reference, which one pass over all the models would not do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from amalgam.checkpoint import TensorInfo

ExtraTensors = Literal["error", "keep_from_first", "drop"]
EXTRA_TENSORS: tuple[ExtraTensors, ...] = ("error", "keep_from_first", "drop")
MAX_NAMED = 5  # models named in one message before "and N more"


@dataclass(frozen=True)
class TensorSource:
    """One tensor of the union of the inputs' tensors and where the output's copy comes from:
    ``merge`` (from every input), ``copy`` (the reference's buffer), ``keep`` (unmerged from
    ``source``, the first input that holds it) or ``drop`` (left out). ``info`` is the source's
    (the reference's for a merge)."""

    name: str
    info: TensorInfo
    origin: Literal["merge", "copy", "keep", "drop"]
    source: str


@dataclass(frozen=True)
class TensorSetProblem:
    """Inputs that do not fit: ``missing`` (``models`` lack the tensor, ``others`` hold it),
    ``shape`` or ``dtype`` (``models`` differ from ``others[0]``; ``detail``: the two values),
    ``stepwise`` (``keep_from_first`` in a continual merge; ``detail`` says why)."""

    tensor: str
    kind: Literal["missing", "shape", "dtype", "stepwise"]
    models: tuple[str, ...]
    others: tuple[str, ...]
    detail: tuple[str, str] | str = ""

    def __str__(self) -> str:
        if self.kind == "missing":
            return (
                f"missing tensor '{self.tensor}': {named(self.models)} lack"
                f"{'s' if len(self.models) == 1 else ''} it, {named(self.others)} "
                f"ha{'s' if len(self.others) == 1 else 've'} it (set extra_tensors: "
                "keep_from_first to copy it from the first that has it, or drop to leave it out)"
            )
        if self.kind == "stepwise":
            return f"tensor '{self.tensor}': {self.detail}"
        theirs, ours = self.detail
        return (
            f"tensor '{self.tensor}': {self.kind} {theirs} in {named(self.models)} "
            f"but {ours} in '{self.others[0]}'"
        )


@dataclass(frozen=True)
class TensorSets:
    """Every tensor of the inputs with its source (sorted by name), and what does not fit."""

    sources: tuple[TensorSource, ...]
    problems: tuple[TensorSetProblem, ...] = field(default=())

    def taken(self, origin: str) -> list[TensorSource]:
        return [s for s in self.sources if s.origin == origin]


def named(labels: Sequence[str]) -> str:
    """``model 'a'`` or ``models 'a', 'b'`` (at most MAX_NAMED, then "and N more")."""
    shown = ", ".join(f"'{x}'" for x in labels[:MAX_NAMED])
    more = f" and {len(labels) - MAX_NAMED} more" if len(labels) > MAX_NAMED else ""
    return f"model{'s' if len(labels) > 1 else ''} {shown}{more}"


def tensor_sources(
    tables: Mapping[str, Mapping[str, TensorInfo]],
    extra_tensors: ExtraTensors = "error",
    *,
    stepwise: bool = False,
) -> TensorSets:
    """Apply the rule (see the module) to ``tables``: each input's tensors by name, labelled,
    the reference first. Reads no tensor."""
    labels = list(tables)
    ref = labels[0]
    names = sorted({n for t in tables.values() for n in t})
    sources: list[TensorSource] = []
    problems: list[TensorSetProblem] = []
    for name in names:
        holders = [x for x in labels if name in tables[x]]
        lacking = tuple(x for x in labels if name not in tables[x])
        first = tables[holders[0]][name]
        fit = _fit(name, first, holders, tables)
        problems += fit
        if fit:
            continue
        if not lacking:
            origin = "merge" if first.is_float else "copy"
            sources.append(TensorSource(name, first, origin, ref))
        elif not first.is_float and holders[0] == ref:
            sources.append(TensorSource(name, first, "copy", ref))
        elif extra_tensors == "error":
            problems.append(TensorSetProblem(name, "missing", lacking, tuple(holders)))
        elif extra_tensors == "drop":
            sources.append(TensorSource(name, first, "drop", holders[0]))
        else:
            sources.append(TensorSource(name, first, "keep", holders[0]))
            if stepwise and holders[0] == ref:
                problems += _stepwise(name, labels, tables)
    return TensorSets(tuple(sources), tuple(problems))


def _fit(
    name: str,
    first: TensorInfo,
    holders: list[str],
    tables: Mapping[str, Mapping[str, TensorInfo]],
) -> list[TensorSetProblem]:
    """Shape and float-ness of ``name`` in every holder against the first holder's."""
    out = []
    for label in holders[1:]:
        info = tables[label][name]
        if info.shape != first.shape:
            shapes = (str(list(info.shape)), str(list(first.shape)))
            out.append(TensorSetProblem(name, "shape", (label,), (holders[0],), shapes))
        elif info.is_float != first.is_float:
            dtypes = (info.dtype, first.dtype)
            out.append(TensorSetProblem(name, "dtype", (label,), (holders[0],), dtypes))
    return out


def _stepwise(
    name: str, labels: list[str], tables: Mapping[str, Mapping[str, TensorInfo]]
) -> list[TensorSetProblem]:
    """A continual merge keeps the reference's copy at the step whose model lacks ``name``;
    a later model that holds it would then be merged into that copy."""
    absorbed = labels[1:]
    for i, label in enumerate(absorbed):
        if name in tables[label]:
            continue
        later = [x for x in absorbed[i + 1 :] if name in tables[x]]
        if later:
            detail = (
                f"extra_tensors: keep_from_first cannot hold in a continual merge: "
                f"'{labels[0]}' has it, '{label}' lacks it, and absorbing '{later[0]}' would "
                "merge it into the copy kept from the reference; use drop, or give every "
                "model the tensor"
            )
            return [TensorSetProblem(name, "stepwise", (label,), (labels[0], *later), detail)]
    return []
