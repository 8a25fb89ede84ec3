"""Merging unrelated models: naive average vs weight matching vs activation matching vs PLeaS.

Model A is the zoo's base. Model B is a model that does not share A's basis: the zoo's second
base (trained from another seed, ``amalgam.zoo.variants``) when this branch has it, otherwise
A with every permutation group and the residual stream randomly permuted plus Gaussian noise
(``--noise`` times each tensor's standard deviation), which the report says. For each
alignment, B is aligned onto A and the linear path (1-t) A + t B is scored at 11 points
(answer-token NLL and mean accuracy on the zoo's test splits, ``amalgam.align.connectivity``).
PLeaS (``amalgam.align.permutation.pleas``) merges A and the best aligned B into one model
(at each ``--budget``), scored at t = 0.5. Writes ``results/align.{md,json,png}``.

    python benchmarks/align.py            # full zoo
    python benchmarks/align.py --quick    # tiny zoo, 4 tasks, 32 records each
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from amalgam.align.connectivity import Curve, PathPoint, curves_json, linear_path, path_point
from amalgam.align.copies import write_aligned_copy
from amalgam.align.permutation.apply import permuted_copy, write_permuted
from amalgam.align.permutation.pleas import pleas_merge, token_batches, wider_model
from amalgam.align.permutation.pleas_copies import calibration_texts
from amalgam.align.permutation.spec import derive_spec
from amalgam.align.permutation.weight_matching import match_weights
from amalgam.align.run import ALIGNERS, run_align
from amalgam.checkpoint import open_checkpoint
from amalgam.device import load_causal_lm
from amalgam.recipe import AlignSpec, PermutationSpec
from amalgam.zoo import Zoo, build_zoo

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "align"


def cpu_model() -> str:
    """The machine's CPU, as ``lscpu`` names it."""
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def noisy_permuted(zoo: Zoo, noise: float, seed: int) -> Path:
    """A with every group and the residual stream permuted, plus relative Gaussian noise."""
    permuted = WORK / f"permuted-{seed}"
    permuted_copy(str(zoo.base), str(permuted), seed, residual=True)
    out = WORK / f"permuted-{seed}-noise-{noise}"
    generator = torch.Generator().manual_seed(seed)

    def add_noise(_name: str, tensor: torch.Tensor) -> torch.Tensor:
        x = tensor.float()
        scale = noise * float(x.std()) if x.numel() > 1 else 0.0
        return (x + scale * torch.randn(x.shape, generator=generator)).to(tensor.dtype)

    write_aligned_copy(open_checkpoint(str(permuted)), str(out), add_noise)
    return out


def model_b(zoo: Zoo, noise: float) -> tuple[Path, str]:
    """(B, how it was made): the second base when the variants exist here, else a copy."""
    if importlib.util.find_spec("amalgam.zoo.variants") is not None:
        from amalgam.zoo.variants import build_variants  # lazy: only on branches that have it

        return build_variants(zoo).second_base, "the zoo's second base (another seed)"
    return (
        noisy_permuted(zoo, noise, seed=1),
        f"a copy of the base, every group and the residual stream permuted, plus noise"
        f" {noise} x each tensor's std (the second base is not on this branch)",
    )


def weight_matched(a: Path, b: Path) -> tuple[Path, float]:
    """(B permuted onto A by weight matching with the residual stream, seconds)."""
    start = time.perf_counter()
    ref, model = open_checkpoint(str(a)), open_checkpoint(str(b))
    spec = derive_spec(model, residual=True)
    perms, _ = match_weights(spec, ref, model)
    out = WORK / "weight_matching" / "b"
    write_permuted(model, str(out), spec, perms)
    return out, time.perf_counter() - start


def aligner_output(method: str, a: Path, b: Path, data: Path) -> tuple[Path, float] | None:
    """(B aligned by ``method``'s aligner in the align stage, seconds), or None when this
    branch has no such aligner."""
    if method not in ALIGNERS:
        return None
    start = time.perf_counter()
    spec = AlignSpec(method=method, permutation=PermutationSpec(data=str(data), residual=True))
    uris = run_align(spec, {"a": str(a), "b": str(b)}, workdir=str(WORK / method))
    return Path(uris["b"]), time.perf_counter() - start


def pleas_point(
    a: Path, b: Path, zoo: Zoo, tasks: list[str], limit: int, budget: float, samples: int
) -> tuple[PathPoint, float, int]:
    """(the PLeaS merge of A and B scored at t = 0.5, seconds, its extra MLP units)."""
    start = time.perf_counter()
    model_a, tokenizer = load_causal_lm(a, "cpu")
    model_b_, _ = load_causal_lm(b, "cpu")
    batches = token_batches(tokenizer, calibration_texts(str(zoo.tasks_dir), samples))
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
        f"A: {meta['a']}. B: {meta['b_made']}. Zoo profile `{meta['profile']}`, tasks"
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
    for note in meta["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n\n## The paths\n\n" + curves_markdown(curves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny zoo, 4 tasks")
    parser.add_argument("--limit", type=int, default=None, help="test records per task")
    parser.add_argument("--samples", type=int, default=64, help="train records per task (data)")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--budget", type=float, nargs="+", default=[0.0, 0.25])
    args = parser.parse_args()
    from amalgam.align.connectivity import plot_curves  # lazy: matplotlib

    zoo = build_zoo(profile="tiny" if args.quick else "full", log=lambda _: None)
    tasks = zoo.task_names[:4] if args.quick else zoo.task_names
    limit = args.limit or (32 if args.quick else 100)
    WORK.mkdir(parents=True, exist_ok=True)
    a = zoo.base
    b, made = model_b(zoo, args.noise)
    notes = []
    curves = [linear_path(str(a), str(b), zoo.tasks_dir, tasks, label="naive", limit=limit)]
    seconds = {"naive": 0.0}
    wm, seconds["weight matching"] = weight_matched(a, b)
    aligned = {"weight matching": wm}
    act = aligner_output("activation_matching", a, b, zoo.tasks_dir)
    if act is None:
        notes.append("Activation matching: no aligner on this branch yet; not measured.")
    else:
        aligned["activation matching"], seconds["activation matching"] = act
    for label, path in aligned.items():
        curves.append(
            linear_path(str(a), str(path), zoo.tasks_dir, tasks, label=label, limit=limit)
        )
    ends = (curves[0].points[0], curves[0].points[-1])
    rows = [
        {**row(c.label, c.barrier, c.midpoint, ends), "seconds": seconds[c.label]} for c in curves
    ]
    basis = "activation matching" if "activation matching" in aligned else "weight matching"
    merged = {}
    for budget in args.budget:
        point, took, extra = pleas_point(a, aligned[basis], zoo, tasks, limit, budget, args.samples)
        label = f"PLeaS after {basis}, budget {budget} (+{extra} MLP units)"
        merged[label] = point
        rise = point.loss - (ends[0].loss + ends[1].loss) / 2
        rows.append({**row(label, rise, point, ends), "seconds": took})
    for r in rows:
        r["barrier_removed"] = 1 - r["barrier"] / curves[0].barrier
    meta = {
        "a": str(a.relative_to(zoo.root)),
        "b_made": made,
        "profile": zoo.profile,
        "tasks": tasks,
        "limit": limit,
        "samples": args.samples,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "command": "python benchmarks/align.py" + (" --quick" if args.quick else ""),
        "notes": notes,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "align.json").write_text(
        json.dumps({**meta, "rows": rows, **curves_json(curves)}, indent=2) + "\n"
    )
    (RESULTS / "align.md").write_text(markdown(meta, rows, curves))
    plot_curves(curves, RESULTS / "align.png", f"A: zoo base, B: {made.split(',')[0]}", merged)
    print((RESULTS / "align.md").read_text())


if __name__ == "__main__":
    main()
