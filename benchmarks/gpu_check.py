"""GPU check: the engine and the quick scorer on CUDA against the CPU, on the tiny zoo.

For each method family (per tensor, whole-model statistics, subspace, data-driven, continual)
the same recipe is merged with ``device: cpu`` and ``device: cuda`` and the outputs compared
tensor by tensor; then models are scored in float32 on the CPU, and in float32 and bfloat16 on
CUDA, and the per-example answers compared; last, the speed benchmark's synthetic Llama family
(``--params``, base + 3, bf16) is merged on the host's CPUs and on CUDA, in the same run.
Needs a CUDA device; writes markdown and JSON.

    python benchmarks/gpu_check.py --zoo .amalgam/zoo/tiny-<hash> --out DIR
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from speed import build_family, llama_shape

from amalgam.engine import MergeOptions, run_merge
from amalgam.evaluate.quick import choice_correct
from amalgam.evaluate.taskdir import read_split
from amalgam.recipe import ModelSpec, Recipe
from amalgam.zoo import Zoo

#: method -> (params, needs task data, continual)
METHODS: dict[str, tuple[dict[str, Any], bool, bool]] = {
    "task_arithmetic": ({"lambda": 0.3}, False, False),
    "ties": ({"density": 0.2, "lambda": 1.0}, False, False),
    "dare_ties": ({"density": 0.2, "lambda": 1.0}, False, False),
    "pcb": ({}, False, False),
    "tsv_m": ({"lambda": 1.0}, False, False),
    "regmean": ({}, True, False),
    "opcm": ({}, False, True),
}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def merge(zoo: Zoo, method: str, out: Path, device: str) -> float:
    """One merge of the zoo's experts (a continual method absorbs them one run at a time)."""
    _, data, continual = METHODS[method]

    def spec(task: str) -> ModelSpec:
        extra = {"data": str(zoo.tasks_dir / task)} if data else {}
        return ModelSpec(uri=str(zoo.experts[task]), name=task, **extra)

    steps = [[t] for t in zoo.task_names] if continual else [list(zoo.task_names)]
    return run_steps(method, str(zoo.base), [[spec(t) for t in s] for s in steps], out, device)


def run_steps(
    method: str, base: str, steps: list[list[ModelSpec]], out: Path, device: str
) -> float:
    """Merge each step's models (continuing from the previous step's output); the seconds."""
    params = METHODS[method][0]
    seconds, previous = 0.0, None
    for k, step in enumerate(steps):
        recipe = Recipe(
            method=method,
            base=base,
            models=step,
            params=params,
            dtype="float32",
        )
        target = out if k == len(steps) - 1 else out.with_name(f"{out.name}-step{k}")
        extra = {"continue_from": str(previous)} if previous else {}
        options = MergeOptions(output=str(target), overwrite=True, device=device, **extra)
        start = time.perf_counter()
        run_merge(recipe, options)
        seconds += time.perf_counter() - start
        previous = target
    return seconds


def compare(a: Path, b: Path) -> dict[str, Any]:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), f"{a} and {b} hold different tensors"
    worst, rel, equal = 0.0, 0.0, 0
    for name, x in ta.items():
        y = tb[name]
        diff = (x.float() - y.float()).abs().max().item()
        worst = max(worst, diff)
        rel = max(rel, diff / max(x.float().abs().max().item(), 1e-12))
        equal += bool(torch.equal(x, y))
    return {"max_abs": worst, "max_rel": rel, "identical_tensors": equal, "tensors": len(ta)}


def score(
    folder: Path, zoo: Zoo, device: str, dtype: torch.dtype, limit: int
) -> dict[str, list[bool]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return {
        t: choice_correct(model, tokenizer, read_split(zoo.tasks_dir, t, "test")[:limit])
        for t in zoo.task_names
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--params", type=float, default=1e8, help="synthetic model size")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    zoo = Zoo.load(args.zoo)
    work = args.out / "work"
    rows: dict[str, Any] = {"device": torch.cuda.get_device_name(), "cpu": platform.processor()}
    merges: dict[str, Any] = {}
    for method in METHODS:
        try:
            cpu_s = merge(zoo, method, work / f"{method}-cpu", "cpu")
            gpu_s = merge(zoo, method, work / f"{method}-cuda", "cuda")
            merges[method] = {
                "cpu_s": cpu_s,
                "cuda_s": gpu_s,
                **compare(work / f"{method}-cpu", work / f"{method}-cuda"),
            }
        except Exception as exc:  # a report line per method, whatever broke
            merges[method] = {"error": f"{type(exc).__name__}: {exc}"}
        print(method, merges[method], flush=True)
    rows["merges"] = merges
    scored: dict[str, Any] = {}
    folders = {"base": zoo.base, "ties": work / "ties-cpu", "tsv_m": work / "tsv_m-cpu"}
    for label, folder in folders.items():
        if not folder.is_dir():
            continue
        ref = score(folder, zoo, "cpu", torch.float32, args.limit)
        for name, device, dtype in (
            ("cuda float32", "cuda", torch.float32),
            ("cuda bfloat16", "cuda", torch.bfloat16),
        ):
            got = score(folder, zoo, device, dtype, args.limit)
            scored[f"{label} / {name}"] = {
                t: {
                    "acc_cpu_fp32": sum(ref[t]) / len(ref[t]),
                    "acc": sum(got[t]) / len(got[t]),
                    "agree": sum(a == b for a, b in zip(ref[t], got[t], strict=True)) / len(ref[t]),
                }
                for t in zoo.task_names
            }
        print(label, "scored", flush=True)
    rows["scores"] = scored
    family = build_family(llama_shape(args.params), 3, work / "family")
    base, *experts = family.values()
    synthetic: dict[str, Any] = {}
    for method in ("task_arithmetic", "ties", "tsv_m"):
        specs = [[ModelSpec(uri=str(p), name=f"e{i}") for i, p in enumerate(experts)]]
        timing = {
            d: run_steps(method, str(base), specs, work / f"big-{method}-{d}", d)
            for d in ("cpu", "cuda")
        }
        synthetic[method] = {
            **timing,
            **compare(work / f"big-{method}-cpu", work / f"big-{method}-cuda"),
        }
        print(method, synthetic[method], flush=True)
    rows["synthetic"] = synthetic
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    lines = [
        f"GPU check on {rows['device']}: tiny zoo merged on CPU and CUDA (float32 math).",
        "",
        "| method | cpu s | cuda s | max abs diff | max rel diff | identical tensors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, m in merges.items():
        if "error" in m:
            lines.append(f"| {method} | error: {m['error']} | | | | |")
        else:
            lines.append(
                f"| {method} | {m['cpu_s']:.2f} | {m['cuda_s']:.2f} | {m['max_abs']:.2e} | "
                f"{m['max_rel']:.2e} | {m['identical_tensors']}/{m['tensors']} |"
            )
    lines += [
        "",
        "| model / scorer | task | acc cpu fp32 | acc | same answer |",
        "|---|---|---|---|---|",
    ]
    for label, per_task in scored.items():
        for t, s in per_task.items():
            lines.append(
                f"| {label} | {t} | {s['acc_cpu_fp32']:.3f} | {s['acc']:.3f} | {s['agree']:.3f} |"
            )
    lines += [
        "",
        f"Synthetic Llama, {args.params:.0e} parameters, bf16, base + 3, {torch.get_num_threads()}"
        f" CPU threads ({rows['cpu'] or platform.machine()}) against {rows['device']}:",
        "",
        "| method | cpu s | cuda s | cpu / cuda | max abs diff | identical tensors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, m in synthetic.items():
        lines.append(
            f"| {method} | {m['cpu']:.2f} | {m['cuda']:.2f} | {m['cpu'] / m['cuda']:.2f} | "
            f"{m['max_abs']:.2e} | {m['identical_tensors']}/{m['tensors']} |"
        )
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
