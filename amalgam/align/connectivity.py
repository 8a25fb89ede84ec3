"""Linear mode connectivity: loss and task accuracy along the straight path between two models.

The model at ``t`` is ``(1 - t) A + t B``, every tensor interpolated in float32 and read one
at a time from the two checkpoints into one in-memory model. The loss is the mean token
negative log-likelihood of the correct answers of a task folder (the perplexity check's text
set); the accuracy is the mean multiple-choice accuracy over the tasks. The barrier is the
largest rise of the loss above the straight line between its two ends,
``max_t [loss(t) - ((1 - t) loss(0) + t loss(1))]``: near 0 when the two models sit in one
basin, large when averaging them breaks both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amalgam.checkpoint import Checkpoint, open_checkpoint
from amalgam.errors import AmalgamError
from amalgam.evaluate.perplexity import sequence_nll, task_texts, token_ids
from amalgam.evaluate.quick import quick_evaluate

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

POINTS = 11


class ConnectivityError(AmalgamError):
    """The two models cannot be interpolated (different tensors or shapes)."""


@dataclass(frozen=True)
class PathPoint:
    """One point of the path: its ``t``, mean answer-token NLL, mean accuracy, per task."""

    t: float
    loss: float
    accuracy: float
    tasks: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Curve:
    """Loss and accuracy along the path between two models, under ``label`` (e.g. ``naive``)."""

    label: str
    points: list[PathPoint]

    @property
    def barrier(self) -> float:
        return barrier([p.t for p in self.points], [p.loss for p in self.points])

    @property
    def midpoint(self) -> PathPoint:
        return min(self.points, key=lambda p: abs(p.t - 0.5))


def path_ts(points: int = POINTS) -> list[float]:
    """``points`` evenly spaced values of ``t`` from 0 to 1 (11: 0, 0.1, ..., 1)."""
    return [round(i / (points - 1), 10) for i in range(points)]


def barrier(ts: Sequence[float], losses: Sequence[float]) -> float:
    """Largest excess of the loss over the chord between the path's ends (0 at the ends)."""
    first, last = losses[0], losses[-1]
    return max(loss - ((1 - t) * first + t * last) for t, loss in zip(ts, losses, strict=True))


def check_interpolable(a: Checkpoint, b: Checkpoint) -> None:
    """Refuse two checkpoints whose tensor names or shapes differ, naming the first that does."""
    names_a, names_b = set(a.names()), set(b.names())
    for name in sorted(names_a ^ names_b):
        holder = a.root if name in names_a else b.root
        raise ConnectivityError(f"{name}: only in {holder}, so the two models cannot be mixed")
    for name in sorted(names_a):
        if a.shape(name) != b.shape(name):
            raise ConnectivityError(
                f"{name}: shape {list(a.shape(name))} in {a.root} but"
                f" {list(b.shape(name))} in {b.root}"
            )


def interpolate_into(model: torch.nn.Module, a: Checkpoint, b: Checkpoint, t: float) -> None:
    """Load ``(1 - t) a + t b`` into ``model``, one tensor of each checkpoint in memory."""
    import torch  # lazy: importing amalgam.align must not load torch

    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in a.names():
            if name not in state:
                raise ConnectivityError(f"{name}: in {a.root} but not a tensor of the model")
            mixed = torch.lerp(a.tensor(name).float(), b.tensor(name).float(), t)
            state[name].copy_(mixed)


def path_point(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks_dir: Path,
    tasks: Sequence[str],
    t: float,
    *,
    limit: int | None = None,
) -> PathPoint:
    """Score ``model`` as it is now: mean answer-token NLL and accuracy on the tasks' tests."""
    total, count = sequence_nll(
        model, token_ids(tokenizer, task_texts(tasks_dir, tasks, "test", limit))
    )
    per_task = quick_evaluate(model, tokenizer, tasks_dir, tasks, limit=limit)
    return PathPoint(
        t=t,
        loss=total / max(count, 1),
        accuracy=sum(per_task.values()) / max(len(per_task), 1),
        tasks=per_task,
    )


def linear_path(
    model_a: str,
    model_b: str,
    tasks_dir: Path,
    tasks: Sequence[str],
    *,
    label: str = "naive",
    points: int = POINTS,
    limit: int | None = None,
    device: str = "cpu",
) -> Curve:
    """Loss and accuracy at ``points`` evenly spaced points of the path from local HF model
    folder ``model_a`` (t = 0) to ``model_b`` (t = 1); the tokenizer is A's."""
    from amalgam.device import load_causal_lm  # lazy: torch and transformers

    a, b = open_checkpoint(model_a), open_checkpoint(model_b)
    try:
        check_interpolable(a, b)
        model, tokenizer = load_causal_lm(model_a, device)
        curve = []
        for t in path_ts(points):
            interpolate_into(model, a, b, t)
            curve.append(path_point(model, tokenizer, tasks_dir, tasks, t, limit=limit))
    finally:
        a.close()
        b.close()
    return Curve(label, curve)


def curves_json(curves: Sequence[Curve], **context: Any) -> dict[str, Any]:
    """The report as JSON: ``context`` (models, tasks), then each curve with its barrier."""
    return {
        **context,
        "curves": [
            {"label": c.label, "barrier": c.barrier, "points": [asdict(p) for p in c.points]}
            for c in curves
        ],
    }


def curves_markdown(curves: Sequence[Curve]) -> str:
    """A summary table (barrier, ends and midpoint per curve) and the loss / accuracy at each t."""
    lines = [
        "| path | barrier (nats) | loss t=0 | loss t=0.5 | loss t=1"
        " | acc t=0 | acc t=0.5 | acc t=1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in curves:
        first, mid, last = c.points[0], c.midpoint, c.points[-1]
        lines.append(
            f"| {c.label} | {c.barrier:.3f} | {first.loss:.3f} | {mid.loss:.3f} | {last.loss:.3f}"
            f" | {first.accuracy:.3f} | {mid.accuracy:.3f} | {last.accuracy:.3f} |"
        )
    lines += ["", "| t | " + " | ".join(f"{c.label} loss | {c.label} acc" for c in curves) + " |"]
    lines.append("|---|" + "---|---|" * len(curves))
    for i, t in enumerate(p.t for p in curves[0].points):
        cells = " | ".join(f"{c.points[i].loss:.3f} | {c.points[i].accuracy:.3f}" for c in curves)
        lines.append(f"| {t:.1f} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_curves(
    curves: Sequence[Curve],
    path: Path,
    title: str,
    merged: Mapping[str, PathPoint] | None = None,
) -> Path:
    """Loss (left) and accuracy (right) against t, one line per curve, and each ``merged``
    model (one that is on no path, like a PLeaS merge) as a marker at its ``t``, as a PNG."""
    from amalgam.evaluate.plots import pyplot  # lazy: matplotlib, only when plotting

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5))
    for c in curves:
        ts = [p.t for p in c.points]
        left.plot(ts, [p.loss for p in c.points], marker="o", label=f"{c.label} ({c.barrier:.2f})")
        right.plot(ts, [p.accuracy for p in c.points], marker="o")
    for (label, point), marker in zip((merged or {}).items(), "*Pd^v", strict=False):
        left.plot([point.t], [point.loss], marker=marker, markersize=11, ls="", label=label)
        right.plot([point.t], [point.accuracy], marker=marker, markersize=11, ls="")
    left.set(xlabel="t  ((1-t) A + t B)", ylabel="answer-token NLL (nats)", title="loss")
    right.set(xlabel="t  ((1-t) A + t B)", ylabel="mean task accuracy", title="accuracy")
    fig.legend(loc="lower center", ncol=2, fontsize="small", title="path (barrier) / merged model")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.22, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def connectivity_report(
    model_a: str,
    model_b: str,
    out_dir: Path,
    tasks_dir: Path,
    tasks: Sequence[str],
    *,
    align: str | None = None,
    data: str | None = None,
    residual: bool = False,
    limit: int | None = None,
    device: str = "cpu",
) -> tuple[list[Curve], list[Path]]:
    """The path from A to B, and with ``align`` (a permutation aligner) also from A to B
    aligned onto A (written under ``out_dir/aligned``); the report's files in ``out_dir``."""
    from amalgam.align.run import ALIGNERS, run_align  # lazy: the aligners import torch
    from amalgam.recipe import AlignSpec, PermutationSpec  # lazy: recipe imports the methods

    if align is not None and (align == "pleas" or align not in ALIGNERS):
        known = ", ".join(sorted(set(ALIGNERS) - {"pleas"})) or "none on this install"
        raise ConnectivityError(
            f"--align {align}: not a permutation aligner that writes an aligned B (known: {known})"
        )
    curves = [linear_path(model_a, model_b, tasks_dir, tasks, limit=limit, device=device)]
    if align is not None:
        spec = AlignSpec(method=align, permutation=PermutationSpec(data=data, residual=residual))
        inputs = {"a": model_a, "b": model_b}
        aligned = run_align(spec, inputs, workdir=str(out_dir / "aligned"))["b"]
        curves.append(
            linear_path(model_a, aligned, tasks_dir, tasks, label=align, limit=limit, device=device)
        )
    title = f"{Path(model_a).name} -> {Path(model_b).name}"
    context = {"a": model_a, "b": model_b, "tasks": list(tasks), "limit": limit}
    return curves, write_report(curves, out_dir, title=title, **context)


def write_report(
    curves: Sequence[Curve], out_dir: Path, *, title: str, **context: Any
) -> list[Path]:
    """``connectivity.json``, ``connectivity.md`` and ``connectivity.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "connectivity.json"
    data.write_text(json.dumps(curves_json(curves, **context), indent=2) + "\n")
    text = out_dir / "connectivity.md"
    text.write_text(f"# {title}\n\n{curves_markdown(curves)}")
    return [data, text, plot_curves(curves, out_dir / "connectivity.png", title)]
