"""TALL-mask storage of the zoo's experts: bytes, and each rebuilt expert's accuracy.

The zoo's experts are stored once with `compress_tall` (base + one multi-task vector + one
bit mask per task) for each mask threshold lambda of the paper's grid; every expert is then
rebuilt with `decompress_model(..., task=...)` and scored on its own task with the quick
scorer (validation and test splits). "chosen" takes, per task, the lambda with the best
validation accuracy (ties: the smaller lambda) and reports its test accuracy: the paper's
per-task selection. Bytes are the files on disk: the TALL folder's weight files (shards with
headers, and the manifest) and the base's weights, against the experts' weight files.

    python benchmarks/compress_tall.py --profile tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "compress_tall"
RESULTS = ROOT / "benchmarks" / "results"
GRID = (0.2, 0.3, 0.4, 0.5, 0.6)
NO_MASK = 0.0  # every entry a task changed takes tau_MTL: the task-arithmetic sum, lambda 1
SPLITS = ("validation", "test")


def score(folder: Path, zoo, task: str, split: str) -> float:
    """Accuracy of the model folder on ``task``'s ``split`` (quick scorer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amalgam.evaluate.quick import quick_evaluate

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    return quick_evaluate(model, tokenizer, zoo.tasks_dir, [task], split=split)[task]


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run(profile: str) -> dict:
    from amalgam.compress import decompress_model
    from amalgam.compress.tall import compress_tall
    from amalgam.recipe import CompressSpec
    from amalgam.zoo import build_zoo

    zoo = build_zoo(profile=profile, log=lambda _: None)
    tasks = list(zoo.task_names)
    experts = {t: str(zoo.experts[t]) for t in tasks}
    shutil.rmtree(WORK, ignore_errors=True)
    original = {t: {s: score(zoo.experts[t], zoo, t, s) for s in SPLITS} for t in tasks}
    base = {t: score(zoo.base, zoo, t, "test") for t in tasks}
    rebuilt: dict[float, dict[str, dict[str, float]]] = {}
    stored: dict[float, dict] = {}
    for lam in (*GRID, NO_MASK):
        packed = WORK / f"tall-{lam}"
        result = compress_tall(
            experts, str(zoo.base), str(packed), CompressSpec(method="tall", tall_lambda=lam)
        )
        stored[lam] = {
            "tall_bytes": result.compressed_bytes,
            "mask_share": sum(t.kept for t in result.tensors)
            / sum(t.numel for t in result.tensors),
        }
        rebuilt[lam] = {}
        for t in tasks:
            out = Path(decompress_model(str(packed), None, str(WORK / f"{t}-{lam}"), task=t))
            rebuilt[lam][t] = {s: score(out, zoo, t, s) for s in SPLITS}
            shutil.rmtree(out)
    chosen = {
        t: min(GRID, key=lambda lam, t=t: (-rebuilt[lam][t]["validation"], lam)) for t in tasks
    }
    experts_bytes = sum(weight_bytes(zoo.experts[t]) for t in tasks)
    return {
        "profile": profile,
        "tasks": tasks,
        "base_bytes": weight_bytes(zoo.base),
        "base": base,
        "experts_bytes": experts_bytes,
        "original": original,
        "rebuilt": {str(k): v for k, v in rebuilt.items()},
        "stored": {str(k): v for k, v in stored.items()},
        "chosen": chosen,
    }


def markdown(r: dict) -> str:
    tasks, grid = r["tasks"], [str(g) for g in GRID]
    orig = {t: r["original"][t]["test"] for t in tasks}
    base = r["base"]
    none = str(NO_MASK)
    lines = [
        f"# TALL-mask storage of the zoo's {len(tasks)} experts (profile `{r['profile']}`)",
        "",
        "Made by `python benchmarks/compress_tall.py --profile "
        f"{r['profile']}`. Test-split accuracy (%) of each expert on its own task, quick "
        "scorer; rebuilt = base + m_t * tau_MTL from the TALL folder (tau_MTL: the sum of the "
        "task vectors), for each lambda of the paper's grid. `chosen`: per task, the lambda "
        "with the best validation accuracy. `no mask`: lambda 0, every entry the task changed "
        "takes tau_MTL (the plain task-arithmetic sum, one model for all tasks).",
        "",
        "| task | base | expert | "
        + " | ".join(f"lambda {g}" for g in grid)
        + " | chosen (lambda) | no mask |",
        "|---|---:|---:|" + "---:|" * len(grid) + "---:|---:|",
    ]
    for t in tasks:
        cells = [f"{100 * r['rebuilt'][g][t]['test']:.1f}" for g in grid]
        c = r["chosen"][t]
        lines.append(
            f"| {t} | {100 * base[t]:.1f} | {100 * orig[t]:.1f} | "
            + " | ".join(cells)
            + f" | {100 * r['rebuilt'][str(c)][t]['test']:.1f} ({c}) | "
            f"{100 * r['rebuilt'][none][t]['test']:.1f} |"
        )

    def retained(acc: dict[str, float]) -> str:
        return f"{100 * sum(acc.values()) / sum(orig.values()):.1f}%"

    def gain(acc: dict[str, float]) -> str:
        """The share of the experts' gain over the base kept, summed over tasks."""
        kept = sum(acc[t] - base[t] for t in tasks)
        return f"{100 * kept / sum(orig[t] - base[t] for t in tasks):.1f}%"

    per_lambda = {g: {t: r["rebuilt"][g][t]["test"] for t in tasks} for g in [*grid, none]}
    chosen = {t: r["rebuilt"][str(r["chosen"][t])][t]["test"] for t in tasks}
    columns = [per_lambda[g] for g in grid] + [chosen, per_lambda[none]]
    lines.append(
        f"| **average** | {100 * mean(base.values()):.1f} | {100 * mean(orig.values()):.1f} | "
        + " | ".join(f"{100 * mean(c.values()):.1f}" for c in columns)
        + " |"
    )
    lines.append(
        f"| accuracy retained (sum) | {retained(base)} | 100% | "
        + " | ".join(retained(c) for c in columns)
        + " |"
    )
    lines.append(
        "| gain over the base retained (sum) | 0% | 100% | "
        + " | ".join(gain(c) for c in columns)
        + " |"
    )
    base, experts = r["base_bytes"], r["experts_bytes"]
    lines += [
        "",
        "## Bytes",
        "",
        f"{len(tasks)} experts' weight files: {experts:,} bytes; the base's: {base:,} bytes.",
        "",
        "| lambda | TALL folder (vector, masks, headers, manifest) | base + TALL | "
        "vs the experts | mask entries set |",
        "|---:|---:|---:|---:|---:|",
    ]
    for g in grid:
        s = r["stored"][g]
        total = base + s["tall_bytes"]
        lines.append(
            f"| {g} | {s['tall_bytes']:,} | {total:,} | {experts / total:.2f}x smaller | "
            f"{100 * s['mask_share']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' weight-loading bars
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    args = parser.parse_args()
    r = run(args.profile)
    suffix = "" if args.profile == "tiny" else f"-{args.profile}"
    (RESULTS / f"compress-tall{suffix}.json").write_text(json.dumps(r, indent=2) + "\n")
    text = markdown(r)
    (RESULTS / f"compress-tall{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
