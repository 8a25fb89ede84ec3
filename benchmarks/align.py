"""Merging unrelated models: naive average vs weight matching vs activation matching vs PLeaS.

Model A is the zoo's base, model B its second base (``amalgam.zoo.variants``: trained from
another seed on the same data, so it shares no basis with A). The alignment data is the
tasks' train splits (the report scores test splits). For weight matching and activation
matching (the align stage's aligners, residual stream included), B is aligned onto A and
the linear path (1-t) A + t B is scored at 11 points (answer-token NLL and mean accuracy on
the zoo's test splits, ``amalgam.align.connectivity``). PLeaS
(``amalgam.align.permutation.pleas``) merges A and the activation-matched B into one model
at each ``--budget``, scored at t = 0.5. Writes ``results/align.{md,json,png}``
(``align-quick.*`` for ``--quick``).

    python benchmarks/align.py            # full zoo
    python benchmarks/align.py --quick    # tiny zoo, 4 tasks, 32 records each
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

from amalgam.align.connectivity import Curve, PathPoint, curves_json, linear_path, path_point
from amalgam.align.permutation.activation_matching import read_texts
from amalgam.align.permutation.pleas import pleas_merge, token_batches, wider_model
from amalgam.align.run import run_align
from amalgam.device import load_causal_lm
from amalgam.recipe import AlignSpec, PermutationSpec
from amalgam.zoo import Zoo, build_zoo
from amalgam.zoo.variants import build_variants

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "align"


def cpu_model() -> str:
    """The machine's CPU, as ``lscpu`` names it."""
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def train_only(tasks_dir: Path, tasks: list[str]) -> Path:
    """A task folder holding only the tasks' train splits: the alignment data (never the
    test records the report scores)."""
    out = WORK / "data"
    for task in tasks:
        (out / task).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tasks_dir / task / "train.jsonl", out / task / "train.jsonl")
    return out


def aligned_b(method: str, a: Path, b: Path, data: Path, samples: int) -> tuple[Path, float]:
    """(B aligned onto A by the align stage's ``method``, residual stream included, seconds)."""
    start = time.perf_counter()
    permutation = PermutationSpec(data=str(data), residual=True, samples=samples)
    spec = AlignSpec(method=method, permutation=permutation)
    workdir = WORK / f"{method}-{b.parent.name}-{samples}"
    uris = run_align(spec, {"a": str(a), "b": str(b)}, workdir=str(workdir))
    return Path(uris["b"]), time.perf_counter() - start


def pleas_point(
    a: Path, b: Path, zoo: Zoo, tasks: list[str], limit: int, budget: float, texts: list[str]
) -> tuple[PathPoint, float, int]:
    """(the PLeaS merge of A and B scored at t = 0.5, seconds, its extra MLP units)."""
    start = time.perf_counter()
    model_a, tokenizer = load_causal_lm(a, "cpu")
    model_b_, _ = load_causal_lm(b, "cpu")
    batches = token_batches(tokenizer, texts)
    merged, _, matching = pleas_merge(model_a, model_b_, batches, budget=budget)
    seconds = time.perf_counter() - start
    model = wider_model(model_a, merged, matching.extra)
    return (
        path_point(model, tokenizer, zoo.tasks_dir, tasks, 0.5, limit=limit),
        seconds,
        matching.extra,
    )


def row(label: str, rise: float, point: PathPoint, ends: tuple[PathPoint, PathPoint]) -> dict:
    """One table row: the barrier, loss and accuracy at ``point``, its accuracy over the
    mean of the ends'."""
    return {
        "method": label,
        "barrier": rise,
        "loss": point.loss,
        "accuracy": point.accuracy,
        "normalized_accuracy": point.accuracy / ((ends[0].accuracy + ends[1].accuracy) / 2),
    }


def markdown(meta: dict, rows: list[dict], curves: list[Curve]) -> str:
    from amalgam.align.connectivity import curves_markdown  # lazy: only for the report

    lines = [
        "# Merging unrelated models",
        "",
        f"A: the zoo's base (`{meta['a']}`). B: the zoo's second base, trained from another"
        f" seed on the same data (`{meta['b']}`). Zoo profile `{meta['profile']}`, tasks"
        f" {', '.join(meta['tasks'])} ({meta['limit']} test records each); PLeaS and activation"
        f" matching fit on {meta['samples']} train records per task. CPU: {meta['cpu']}"
        f" ({meta['threads']} torch threads). Command: `{meta['command']}`.",
        "",
        "Barrier: the loss (mean answer-token NLL, nats) above the chord between A and B, the"
        " largest over the 11 path points for a path, at t = 0.5 for a PLeaS merge. Loss and"
        " accuracy: at t = 0.5 (the average; the PLeaS merge). Normalized accuracy: mean task"
        " accuracy over the mean of A's and B's.",
        "",
        "| method | barrier (nats) | share of naive barrier removed | loss | accuracy"
        " | normalized accuracy | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['barrier']:.3f} | {r['barrier_removed']:.0%} | {r['loss']:.3f}"
            f" | {r['accuracy']:.3f} | {r['normalized_accuracy']:.3f} | {r.get('seconds', 0):.1f} |"
        )
    return "\n".join(lines) + "\n\n## The paths\n\n" + curves_markdown(curves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny zoo, 4 tasks")
    parser.add_argument("--limit", type=int, default=None, help="test records per task")
    parser.add_argument("--samples", type=int, default=64, help="train records per task (data)")
    parser.add_argument("--budget", type=float, nargs="+", default=[0.0, 0.25])
    args = parser.parse_args()
    from amalgam.align.connectivity import plot_curves  # lazy: matplotlib

    zoo = build_zoo(profile="tiny" if args.quick else "full", log=lambda _: None)
    tasks = zoo.task_names[:4] if args.quick else zoo.task_names
    limit = args.limit or (32 if args.quick else 100)
    WORK.mkdir(parents=True, exist_ok=True)
    a, b = zoo.base, build_variants(zoo, log=lambda _: None).second_base
    data = train_only(zoo.tasks_dir, tasks)
    samples = args.samples * len(tasks)
    curves = [linear_path(str(a), str(b), zoo.tasks_dir, tasks, label="naive", limit=limit)]
    seconds = {"naive": 0.0}
    aligned = {}
    for method in ("weight_matching", "activation_matching"):
        label = method.replace("_", " ")
        aligned[label], seconds[label] = aligned_b(method, a, b, data, samples)
        curves.append(
            linear_path(str(a), str(aligned[label]), zoo.tasks_dir, tasks, label=label, limit=limit)
        )
    ends = (curves[0].points[0], curves[0].points[-1])
    rows = [
        {**row(c.label, c.barrier, c.midpoint, ends), "seconds": seconds[c.label]} for c in curves
    ]
    texts = read_texts(str(data), samples)
    merged = {}
    for budget in args.budget:
        point, took, extra = pleas_point(
            a, aligned["activation matching"], zoo, tasks, limit, budget, texts
        )
        label = f"PLeaS after activation matching, budget {budget} (+{extra} MLP units)"
        merged[label] = point
        rise = point.loss - (ends[0].loss + ends[1].loss) / 2
        rows.append({**row(label, rise, point, ends), "seconds": took})
    for r in rows:
        r["barrier_removed"] = 1 - r["barrier"] / curves[0].barrier
    meta = {
        "a": str(a.relative_to(zoo.root)),
        "b": str(b.relative_to(b.parents[1])),
        "profile": zoo.profile,
        "tasks": tasks,
        "limit": limit,
        "samples": args.samples,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "command": "python benchmarks/align.py" + (" --quick" if args.quick else ""),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "align-quick" if args.quick else "align"
    (RESULTS / f"{name}.json").write_text(
        json.dumps({**meta, "rows": rows, **curves_json(curves)}, indent=2) + "\n"
    )
    (RESULTS / f"{name}.md").write_text(markdown(meta, rows, curves))
    title = f"zoo base (A) vs second base (B), {zoo.profile} profile"
    plot_curves(curves, RESULTS / f"{name}.png", title, merged)
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
