"""Can these checkpoints be merged tensor by tensor? Same tensor names and shapes, same vocabulary.

``check_inputs`` is the align stage's ``check`` method (see :mod:`amalgam.align.run`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from amalgam import storage
from amalgam.adapters import open_input
from amalgam.align.tensor_sets import ExtraTensors, TensorSetProblem, tensor_sources
from amalgam.checkpoint import Checkpoint
from amalgam.errors import AmalgamError

if TYPE_CHECKING:
    from amalgam.recipe import AlignSpec

MAX_LISTED = 5  # differences listed per model and kind before "... and N more"
KINDS = ("missing_tensor", "extra_tensor", "shape", "dtype", "stepwise", "vocab_size", "vocabulary")
EXTRA_HINT = (
    "  (a recipe's extra_tensors: keep_from_first copies a tensor only some models hold from "
    "the first that has it; drop leaves it out)"
)


class CompatibilityError(AmalgamError):
    """Inputs differ in tensor names, shapes or vocabulary; the message names each difference
    (and ends with ``hint`` when given)."""

    def __init__(self, report: CompatibilityReport, hint: str = ""):
        super().__init__(report.describe() + (f"\n{hint}" if hint else ""))
        self.report = report


@dataclass(frozen=True)
class Problem:
    """One difference between a model and the reference: kind, what, and the two sides."""

    model: str
    kind: str  # missing_tensor | extra_tensor | shape | dtype | stepwise | vocab_size | vocabulary
    item: str  # tensor name, config file or token
    detail: str  # the model's value vs the reference's (shapes, ids, sizes)

    def __str__(self) -> str:
        what = {
            "missing_tensor": f"lacks tensor {self.item}"
            + (f" ({self.detail} have it)" if self.detail else ""),
            "extra_tensor": f"has tensor {self.item}, which the reference lacks",
            "shape": f"tensor {self.item} has shape {self.detail}",
            "dtype": f"tensor {self.item} is {self.detail} (float in one, not in the other)",
            "stepwise": f"tensor {self.item}: {self.detail}",
            "vocab_size": f"{self.item} vocab_size is {self.detail}",
            "vocabulary": f"token {self.item} has {self.detail}",
        }[self.kind]
        return f"{self.model}: {what}"


@dataclass
class CompatibilityReport:
    """The reference model, the models compared with it, and every difference found."""

    reference: str
    models: list[str]
    tensors: int
    uris: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        if self.ok:
            return (
                f"compatible: {', '.join(self.models)} match {self.reference} "
                f"({self.tensors} tensors)"
            )
        where = self.uris.get(self.reference)
        lines = [
            f"models differ from the reference {self.reference}"
            + (f" ({where})" if where else "")
            + ":"
        ]
        for model in self.models:
            for kind in KINDS:
                found = [p for p in self.problems if p.model == model and p.kind == kind]
                lines += [f"  {p}" for p in found[:MAX_LISTED]]
                if len(found) > MAX_LISTED:
                    lines.append(f"  {model}: ... and {len(found) - MAX_LISTED} more {kind}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "models": self.models,
            "tensors": self.tensors,
            "uris": self.uris,
            "ok": self.ok,
            "problems": [vars(p) for p in self.problems],
        }


def tensor_problems(
    label: str,
    ref: Checkpoint,
    other: Checkpoint,
    extra_tensors: ExtraTensors = "error",
    *,
    ref_label: str = "reference",
) -> list[Problem]:
    """What keeps ``other`` from merging with ``ref`` under the inputs' tensor rule
    (:func:`amalgam.align.tensor_sets.tensor_sources`): a tensor one lacks, shapes, dtypes."""
    sets = tensor_sources({ref_label: ref.tensors, label: other.tensors}, extra_tensors)
    return as_problems(sets.problems, ref_label)


def as_problems(found: tuple[TensorSetProblem, ...], reference: str) -> list[Problem]:
    """The tensor rule's problems, each told per model against the reference."""
    out = []
    for p in found:
        if p.kind == "missing" and reference in p.others:
            held = ", ".join(p.others)
            out += [Problem(m, "missing_tensor", p.tensor, held) for m in p.models]
        elif p.kind == "missing":
            out += [Problem(m, "extra_tensor", p.tensor, "") for m in p.others]
        elif p.kind == "stepwise":
            out.append(Problem(p.models[0], p.kind, p.tensor, str(p.detail)))
        else:
            theirs, ours = p.detail
            against = "the reference" if p.others[0] == reference else p.others[0]
            out.append(Problem(p.models[0], p.kind, p.tensor, f"{theirs}, {against} {ours}"))
    return out


def _vocabulary(ckpt: Checkpoint) -> dict[str, int] | None:
    """Token -> id from the checkpoint's tokenizer.json (model vocabulary plus added tokens)."""
    if ckpt.kind == "file":
        return None
    path = storage.join(ckpt.root, "tokenizer.json")
    if not ckpt.fs.exists(path):
        return None
    with ckpt.fs.open(path, "rb") as fh:
        data = json.loads(fh.read())
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, list):  # unigram: [token, score] pairs in id order
        vocab = {entry[0]: i for i, entry in enumerate(vocab)}
    out = dict(vocab or {})
    out.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
    return out


def vocabulary_problems(label: str, ref: Checkpoint, other: Checkpoint) -> list[Problem]:
    """Differences in config ``vocab_size`` and in tokenizer.json's token -> id map."""
    problems = []
    ref_size = (ref.config or {}).get("vocab_size")
    other_size = (other.config or {}).get("vocab_size")
    if ref_size is not None and other_size is not None and ref_size != other_size:
        problems.append(
            Problem(label, "vocab_size", "config.json", f"{other_size}, the reference {ref_size}")
        )
    ref_vocab, vocab = _vocabulary(ref), _vocabulary(other)
    if ref_vocab is None or vocab is None:
        return problems
    for token in sorted(set(ref_vocab) | set(vocab)):
        a, b = vocab.get(token), ref_vocab.get(token)
        if a != b:
            theirs = "no id" if a is None else f"id {a}"
            ours = "none" if b is None else f"id {b}"
            problems.append(
                Problem(label, "vocabulary", repr(token), f"{theirs}, the reference {ours}")
            )
    return problems


def check_compatibility(
    models: Mapping[str, str | Checkpoint] | Sequence[str | Checkpoint],
    *,
    vocabulary: bool = True,
    raise_on_error: bool = True,
    extra_tensors: ExtraTensors = "error",
    stepwise: bool = False,
    **storage_options: Any,
) -> CompatibilityReport:
    """Compare every model with the first one (the base, when the caller puts it first).

    ``models`` maps labels to URIs or open checkpoints (a list is labelled by URI). Tensors
    only some models hold follow the merge plan's rule, ``extra_tensors`` and ``stepwise``
    as in :func:`amalgam.align.tensor_sets.tensor_sources`. Raises :class:`CompatibilityError`
    naming each model and tensor or token that differs, unless ``raise_on_error`` is false;
    then the report's ``ok`` and ``problems`` say it. A PEFT adapter is compared as the dense
    model it makes over its base (``BASE+ADAPTER``, else the URI labelled ``base``).
    """
    if not isinstance(models, Mapping):
        models = {(m.uri if isinstance(m, Checkpoint) else str(m)): m for m in models}
    if len(models) < 1:
        raise AmalgamError("check_compatibility: no models given")
    opened: list[Checkpoint] = []
    ckpts: dict[str, Checkpoint] = {}
    base = models.get("base")  # a PEFT adapter without BASE+ in its URI opens over it
    base = base if isinstance(base, str) else None
    try:
        for label, m in models.items():
            if isinstance(m, Checkpoint):
                ckpts[label] = m
            else:
                ckpts[label] = open_input(m, base=base, **storage_options)
                opened.append(ckpts[label])
        (ref_label, ref), *others = ckpts.items()
        report = CompatibilityReport(
            ref_label,
            [label for label, _ in others],
            len(ref.tensors),
            uris={label: c.uri for label, c in ckpts.items()},
        )
        tables = {label: c.tensors for label, c in ckpts.items()}
        found = tensor_sources(tables, extra_tensors, stepwise=stepwise).problems
        report.problems += as_problems(found, ref_label)
        if vocabulary:
            for label, ckpt in others:
                report.problems += vocabulary_problems(label, ref, ckpt)
    finally:
        for c in opened:
            c.close()
    if raise_on_error and not report.ok:
        raise CompatibilityError(report)
    return report


def check_inputs(
    spec: AlignSpec,
    inputs: Mapping[str, str],
    *,
    extra_tensors: ExtraTensors = "error",
    stepwise: bool = False,
    **storage_options: Any,
) -> dict[str, str]:
    """The ``check`` method: labelled input URIs in (base first), the same out.

    Raises :class:`CompatibilityError` on any difference and passes the inputs on;
    tensors only some inputs hold follow the recipe's ``extra_tensors`` (``stepwise`` for a
    continual method), the rule the merge plan applies.
    """
    report = check_compatibility(
        inputs,
        vocabulary=spec.vocabulary,
        raise_on_error=False,
        extra_tensors=extra_tensors,
        stepwise=stepwise,
        **storage_options,
    )
    if not report.ok:
        gaps = any(p.kind in ("missing_tensor", "extra_tensor") for p in report.problems)
        raise CompatibilityError(report, EXTRA_HINT if gaps else "")
    return dict(inputs)
