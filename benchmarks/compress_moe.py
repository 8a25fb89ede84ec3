"""MC-SMoE benchmark: the zoo's 8-expert MoE merged down to 4 and 2 experts per layer.

Builds the MoE as `benchmarks/moe_build.py` does (`amalgam.moe.build_moe`, `gate_mode: hidden`,
2 experts per token, the first `--prompts` train prompts of each expert's task as its positive
prompts), then compresses it with `compress.method: mc_smoe` (arXiv 2310.01334: experts
grouped by router-logit similarity around the most used ones, aligned by weight matching,
merged with usage frequencies as weights; each group keeps its dominant expert's router row)
and, in the same run, with the two baselines: `drop` (keep the most used experts, drop the
others) and `uniform` without alignment (plain averages of the same groups); the method and
the uniform baseline also with `router_fold: average` (a group's router row: its members'
rows averaged with the merge's weights). Calibration: the first `--calibration` train records
of every task, interleaved (prompt and correct answer). Every model is scored on the test split with
`amalgam.evaluate.quick_evaluate`; the dense experts give the normalisation. Reports per-task
accuracy, the share of the MoE's accuracy kept, parameters and bytes, each layer's groups,
and the calibration routing frequencies. Writes `results/compress.{md,json,png}`.

    python benchmarks/compress_moe.py                  # full zoo (about 3 minutes, 2 cores)
    python benchmarks/compress_moe.py --profile tiny   # tiny zoo (results/compress-tiny.*)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from moe_build import load, pct, routing, score, short

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "compress_moe"
#: label -> (expert_merge, align, router_fold): the paper's method and the two baselines, and
#: the method and the uniform baseline with averaged router rows.
METHODS = {
    "mc_smoe": ("frequency", True, "dominant"),
    "drop (keep most used)": ("drop", False, "dominant"),
    "uniform (no alignment)": ("uniform", False, "dominant"),
    "mc_smoe, averaged router": ("frequency", True, "average"),
    "uniform, averaged router": ("uniform", False, "average"),
}
TARGETS = (4, 2)


def calibration_file(zoo: Any, tasks: list[str], per_task: int, path: Path) -> Path:
    """The first ``per_task`` train records of every task, interleaved, as prompt + answer."""
    from amalgam.evaluate.taskdir import read_split

    splits = [read_split(zoo.tasks_dir, t, "train")[:per_task] for t in tasks]
    lines = []
    for records in zip(*splits, strict=True):
        for r in records:
            lines.append(json.dumps({"prompt": r["prompt"], "answer": r["choices"][r["label"]]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    from amalgam.compress.moe_compress import compress_moe
    from amalgam.evaluate.taskdir import read_split
    from amalgam.moe import build_moe, parse_moe_config
    from amalgam.recipe import CompressSpec
    from amalgam.zoo import build_zoo, default_zoo_dir

    torch.set_num_threads(1)
    started = time.perf_counter()
    zoo = build_zoo(default_zoo_dir(), profile=args.profile, log=log)
    tasks = list(zoo.task_names)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log("scoring experts")
    own = {t: score(zoo.experts[t], zoo, [t], args.limit)[t] for t in tasks}
    experts = [
        {
            "source_model": str(zoo.experts[t]),
            "positive_prompts": [
                r["prompt"] for r in read_split(zoo.tasks_dir, t, "train")[: args.prompts]
            ],
        }
        for t in tasks
    ]
    config = {"base_model": str(zoo.base), "gate_mode": "hidden", "experts": experts}
    moe = work / "moe"
    build_moe(parse_moe_config(config), str(moe))
    calibration = calibration_file(zoo, tasks, args.calibration, work / "calibration.jsonl")
    rows: dict[str, dict[str, Any]] = {}
    model, _ = load(moe)
    rows["moe (8 experts)"] = {
        "method": "moe",
        "experts": 8,
        "scores": score(moe, zoo, tasks, args.limit),
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": 0.0,
    }
    report = None
    for k in TARGETS:
        for label, (merge, align, fold) in METHODS.items():
            log(f"{label} to {k} experts")
            spec = CompressSpec(
                method="mc_smoe",
                experts=k,
                calibration=str(calibration),
                calibration_samples=args.calibration * len(tasks),
                expert_merge=merge,
                align=align,
                router_fold=fold,
            )
            out = work / f"{merge}-{fold}-{k}"
            t0 = time.perf_counter()
            result = compress_moe(str(moe), str(out), spec)
            seconds = time.perf_counter() - t0
            model, _ = load(out)
            report = result.report
            rows[f"{label}, {k} experts"] = {
                "method": label,
                "experts": k,
                "scores": score(out, zoo, tasks, args.limit),
                "params": sum(p.numel() for p in model.parameters()),
                "params_report": report["params_after"],
                "bytes": report["bytes_after"],
                "groups": {layer: v["groups"] for layer, v in report["layers"].items()},
                "units_moved": sum(
                    sum(sum(m) for m in v.get("units_moved", {}).values())
                    for v in report["layers"].values()
                ),
                "seconds": seconds,
            }
    assert report is not None
    rows["moe (8 experts)"]["bytes"] = report["bytes_before"]
    return {
        "zoo": zoo.root.name,
        "tasks": tasks,
        "limit": args.limit,
        "prompts_per_expert": args.prompts,
        "calibration_per_task": args.calibration,
        "calibration_tokens": report["routing"]["tokens"],
        "frequency": {layer: v["frequency"] for layer, v in report["layers"].items()},
        "routing": routing(moe, zoo, tasks, args.limit),
        "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
        "1 thread",
        "own": own,
        "rows": rows,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "seconds": time.perf_counter() - started,
    }


def summary(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per row: average accuracy, normalized accuracy, and the share of the MoE's average."""
    tasks, own = result["tasks"], result["own"]
    moe = mean(result["rows"]["moe (8 experts)"]["scores"].values())
    out = {}
    for label, row in result["rows"].items():
        avg = mean(row["scores"].values())
        norm = mean(row["scores"][t] / own[t] if own[t] else 0.0 for t in tasks)
        out[label] = {"avg": avg, "normalized": norm, "kept": avg / moe}
    return out


def report(result: dict[str, Any]) -> str:
    tasks, rows = result["tasks"], result["rows"]
    stats = summary(result)
    names = [short(t) for t in tasks]
    lines = [
        "# MC-SMoE: the zoo's 8-expert MoE with fewer experts per layer",
        "",
        f"Zoo `{result['zoo']}`, test split"
        + (f" (first {result['limit']} per task)" if result["limit"] else "")
        + f". The MoE: `amalgam.moe.build_moe`, `gate_mode: hidden`, top-2, routers from the "
        f"first {result['prompts_per_expert']} train prompts per task. Calibration for "
        f"routing statistics: the first {result['calibration_per_task']} train records of "
        f"each task (prompt + answer), {result['calibration_tokens']:,} tokens. "
        f"{result['machine']}; whole run {result['seconds']:.0f} s, peak RSS "
        f"{result['peak_rss_gb']:.2f} GB (scoring included). Produced by "
        "`python benchmarks/compress_moe.py`.",
        "",
        "`mc_smoe`: the paper's merge (groups around the most used experts by router-logit "
        "similarity, members aligned by weight matching, frequency-weighted average; each "
        "group keeps its dominant expert's router row). Baselines on the same statistics: "
        "`drop` keeps the most used experts and drops the rest; `uniform` averages the same "
        "groups plainly, without alignment. `averaged router`: `router_fold: average`, a "
        "group's router row is its members' rows averaged with the merge's weights. No "
        "LoSparse step and no distillation finetune.",
        "",
        "## Accuracy (%) per task",
        "",
        "`normalized`: mean over tasks of accuracy / the task's own expert's accuracy; "
        "`kept`: average accuracy / the 8-expert MoE's.",
        "",
        "| model | " + " | ".join(names) + " | avg | normalized | kept |",
        "|---|" + "---:|" * (len(tasks) + 3),
        "| experts, each on its own task | "
        + " | ".join(pct(result["own"][t]) for t in tasks)
        + f" | {pct(mean(result['own'].values()))} | 100.0 | |",
    ]
    for label, row in rows.items():
        s = stats[label]
        cells = " | ".join(pct(row["scores"][t]) for t in tasks)
        lines.append(
            f"| {label} | {cells} | {pct(s['avg'])} | {pct(s['normalized'])} | {pct(s['kept'])} |"
        )
    half = stats[f"mc_smoe, {TARGETS[0]} experts"]
    rivals = {b: stats[f"{b}, {TARGETS[0]} experts"]["avg"] for b in list(METHODS)[1:3]}
    met = half["kept"] >= 0.95 and all(half["avg"] > v for v in rivals.values())
    lines += [
        "",
        f"Target at {TARGETS[0]} experts (half): MC-SMoE keeps >= 95% of the MoE's accuracy and "
        f"beats both baselines: **{'met' if met else 'not met'}** (kept {pct(half['kept'])}%; "
        + "; ".join(f"{b} {pct(v)} vs mc_smoe {pct(half['avg'])}" for b, v in rivals.items())
        + ").",
        "",
        "## Size",
        "",
        "Parameters as transformers loads them (equal to the report's count in every row); "
        "bytes: the weights written; units moved: intermediate units that weight matching "
        "put in another place, summed over layers and group members (0: every member was "
        "already in its dominant's order, as fine-tunes of one base are).",
        "",
        "| model | experts per layer | parameters | bytes | units moved by alignment | "
        "compress s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, row in rows.items():
        lines.append(
            f"| {label} | {row['experts']} | {row['params']:,} | {row['bytes']:,} | "
            f"{row.get('units_moved', '')} | {row['seconds']:.1f} |"
        )
    lines += [
        "",
        "## Calibration routing and groups",
        "",
        "Share (%) of the top-2 selections each expert (named by its task) gets over the "
        "calibration tokens, and the groups (dominant expert first) at 4 and 2 experts.",
        "",
        "| layer | " + " | ".join(names) + " | groups at 4 | groups at 2 |",
        "|---|" + "---:|" * len(tasks) + "---|---|",
    ]
    for layer, freq in result["frequency"].items():
        groups = [rows[f"mc_smoe, {k} experts"]["groups"][layer] for k in TARGETS]
        named = [" / ".join("+".join(names[e] for e in g) for g in gs) for gs in groups]
        lines.append(
            f"| {layer} | " + " | ".join(pct(f) for f in freq) + f" | {named[0]} | {named[1]} |"
        )
    lines += [
        "",
        "## Routing of the 8-expert MoE on the test prompts",
        "",
        "Per task (rows), the share (%) of top-2 slots each expert gets; **bold**: its own.",
    ]
    for layer in range(len(next(iter(result["routing"].values())))):
        lines += ["", f"Layer {layer}:", ""]
        lines.append("| task | " + " | ".join(names) + " |")
        lines.append("|---|" + "---:|" * len(tasks))
        for i, task in enumerate(tasks):
            shares = result["routing"][task][layer]
            cells = [f"**{pct(s)}**" if j == i else pct(s) for j, s in enumerate(shares)]
            lines.append(f"| {names[i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Average accuracy against experts per layer, one line per method."""
    from amalgam.evaluate.plots import pyplot

    plt = pyplot()
    stats = summary(result)
    moe = stats["moe (8 experts)"]["avg"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in METHODS:
        ks = [8, *TARGETS]
        ys = [moe] + [stats[f"{label}, {k} experts"]["avg"] for k in TARGETS]
        ax.plot(ks, [100 * y for y in ys], marker="o", label=label)
    own = mean(result["own"].values())
    ax.axhline(100 * own, color="grey", linestyle=":", label="dense experts, own task")
    ax.set_xticks([8, *TARGETS])
    ax.set_xlabel("experts per layer")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(f"MC-SMoE on the zoo MoE ({result['zoo']})")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="full", choices=["full", "tiny"])
    parser.add_argument("--limit", type=int, default=None, help="test examples per task")
    parser.add_argument("--prompts", type=int, default=8, help="router prompts per expert")
    parser.add_argument("--calibration", type=int, default=32, help="train records per task")
    parser.add_argument("--work", default=str(WORK))
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = run(args)
    stem = "compress" if args.profile == "full" else f"compress-{args.profile}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(report(result))
    plot(result, RESULTS / f"{stem}.png")
    print(report(result))


if __name__ == "__main__":
    main()
