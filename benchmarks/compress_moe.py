"""MC-SMoE benchmark: an 8-expert MoE merged down to 4 and 2 experts per layer.

Two subjects (`--subject`): `built` (default), the zoo's 8 dense experts made one MoE as
`benchmarks/moe_build.py` does (`amalgam.moe.build_moe`, `gate_mode: hidden`, 2 experts per
token, the first `--prompts` train prompts of each expert's task as its positive prompts),
and `zoo`, the zoo's own Mixtral (8 experts trained from scratch with a load-balancing loss:
their units lie in unrelated orders, so alignment has work to do).

Each is compressed with `compress.method: mc_smoe` (arXiv 2310.01334: experts grouped by
router-logit similarity around the most used ones, aligned by weight matching, merged with
usage frequencies as weights; each group keeps its dominant expert's router row) and, in the
same run, with the two baselines: `drop` (keep the most used experts, drop the others) and
`uniform` without alignment (plain averages of the same groups); the method and the uniform
baseline also with `router_fold: average` (a group's router row: its members' rows averaged
with the merge's weights). At 4 experts MC-SMoE is also followed by its compress step
(`losparse_rank`/`losparse_density`, one row per `--losparse` setting: each merged expert
weight as a truncated SVD plus the residual's largest entries, no finetune), stored as a
compressed folder (exact bytes of its files) and decompressed to be scored. Calibration: the
first `--calibration` train records of every task, interleaved (prompt and correct answer).
Every model is scored on the test split with `amalgam.evaluate.quick_evaluate`; the dense
experts give the normalisation. Reports per-task accuracy, the share of the MoE's accuracy
kept, parameters and bytes, each layer's groups, and the routing frequencies. Writes
`results/compress{-zoo}{-tiny}.{md,json,png}`.

`--memory` measures peak memory instead: a random float32 Mixtral (`--hidden`, 4 layers, 8
experts, the zoo's tokenizer) merged to 4 experts in a fresh process, once computing the
routing statistics and once with them cached; the peak RSS above the RSS after imports,
against the model, its largest tensor and one group's expert weights
(`results/compress-memory.{md,json}`).

With `--zoo DIR` the tasks and dense experts come from that zoo build; when it is not the
profile's current build, the zoo MoE is trained here by `amalgam.zoo.build.train_moe` (the
bits the current build writes: its seeds depend on the profile alone).

    python benchmarks/compress_moe.py                  # full zoo (about 3 minutes, 2 cores)
    python benchmarks/compress_moe.py --profile tiny   # tiny zoo (results/compress-tiny.*)
    python benchmarks/compress_moe.py --subject zoo    # the zoo's own MoE
    python benchmarks/compress_moe.py --memory         # peak RSS of MC-SMoE
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
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
MOE = "moe (8 experts)"


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
    from amalgam.recipe import CompressSpec
    from amalgam.zoo import Zoo, build_zoo, default_zoo_dir

    torch.set_num_threads(1)
    started = time.perf_counter()
    zoo = Zoo.load(args.zoo) if args.zoo else build_zoo(default_zoo_dir(), profile=args.profile)
    tasks = list(zoo.task_names)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log("scoring experts")
    own = {t: score(zoo.experts[t], zoo, [t], args.limit)[t] for t in tasks}
    if args.subject == "zoo":
        moe, origin = zoo_moe(zoo, work, log)
    else:
        moe, origin = built_moe(zoo, tasks, args.prompts, work), "built"
    calibration = calibration_file(zoo, tasks, args.calibration, work / "calibration.jsonl")
    rows: dict[str, dict[str, Any]] = {}
    model, _ = load(moe)
    rows[MOE] = {
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
        if k == TARGETS[0]:
            rows |= losparse_rows(moe, zoo, tasks, calibration, k, args, work, log)
    assert report is not None
    rows[MOE]["bytes"] = report["bytes_before"]
    return {
        "subject": args.subject,
        "moe_origin": origin,
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


def zoo_moe(zoo: Any, work: Path, log: Callable[[str], None]) -> tuple[Path, str]:
    """The zoo's own MoE: its folder when ``zoo`` is the profile's current build, else the
    profile's MoE trained here by the zoo's code."""
    from amalgam.zoo.build import get_profile, prepare_data, save_model, train_moe, zoo_hash

    config = get_profile(zoo.profile)
    if zoo.hash == zoo_hash(config):
        return zoo.moe, f"zoo build {zoo.root.name}"
    log(f"training the {zoo.profile} profile's MoE (zoo {zoo.root.name} predates it)")
    tokenizer, _, pools = prepare_data(config)
    out = work / "zoo-moe"
    save_model(train_moe(config, tokenizer, pools, log), tokenizer, out)
    return out, f"amalgam.zoo.build.train_moe, profile {zoo.profile}, zoo hash {zoo_hash(config)}"


def losparse_rows(
    moe: Path,
    zoo: Any,
    tasks: list[str],
    calibration: Path,
    k: int,
    args: argparse.Namespace,
    work: Path,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """MC-SMoE to ``k`` experts then low-rank + sparse experts, one row per ``--losparse``."""
    from amalgam.compress.moe_compress import compress_moe
    from amalgam.compress.stage import decompress_model
    from amalgam.recipe import CompressSpec

    rows = {}
    for setting in args.losparse.split(","):
        rank, density = int(setting.split(":")[0]), float(setting.split(":")[1])
        label = f"mc_smoe + losparse r={rank} d={density:g}"
        log(f"{label} to {k} experts")
        spec = CompressSpec(
            method="mc_smoe",
            experts=k,
            calibration=str(calibration),
            calibration_samples=args.calibration * len(tasks),
            losparse_rank=rank,
            losparse_density=density,
        )
        out = work / f"losparse-{rank}-{density:g}-{k}"
        t0 = time.perf_counter()
        report = compress_moe(str(moe), str(out), spec).report
        seconds = time.perf_counter() - t0
        dense = work / f"losparse-{rank}-{density:g}-{k}-dense"
        decompress_model(str(out), None, str(dense))
        model, _ = load(dense)
        rows[f"{label}, {k} experts"] = {
            "method": label,
            "experts": k,
            "scores": score(dense, zoo, tasks, args.limit),
            "params": sum(p.numel() for p in model.parameters()),
            "params_stored": report["stored_params"],
            "bytes": report["bytes_after"],
            "seconds": seconds,
        }
    return rows


def built_moe(zoo: Any, tasks: list[str], prompts: int, work: Path) -> Path:
    """The zoo's dense experts as one MoE, routers from each task's first train prompts."""
    from amalgam.evaluate.taskdir import read_split
    from amalgam.moe import build_moe, parse_moe_config

    experts = [
        {
            "source_model": str(zoo.experts[t]),
            "positive_prompts": [
                r["prompt"] for r in read_split(zoo.tasks_dir, t, "train")[:prompts]
            ],
        }
        for t in tasks
    ]
    config = {"base_model": str(zoo.base), "gate_mode": "hidden", "experts": experts}
    build_moe(parse_moe_config(config), str(work / "moe"))
    return work / "moe"


MEASURE = """
import json, sys
from amalgam.compress.moe_compress import compress_moe
from amalgam.recipe import CompressSpec
from transformers import MixtralForCausalLM

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
compress_moe(sys.argv[1], sys.argv[2], CompressSpec.model_validate_json(sys.argv[3]))
print(json.dumps({"rss_after_imports": before, "peak_rss": status("VmHWM")}))
"""


def memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of MC-SMoE in fresh processes (statistics computed, then cached) on a random
    Mixtral, against the model, its largest tensor and the largest group's expert weights."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from amalgam.checkpoint import open_checkpoint
    from amalgam.compress.moe_compress import read_report
    from amalgam.recipe import CompressSpec
    from amalgam.zoo import Zoo, build_zoo, default_zoo_dir

    torch.set_num_threads(1)
    zoo = Zoo.load(args.zoo) if args.zoo else build_zoo(default_zoo_dir(), profile=args.profile)
    work = Path(args.work) / "memory"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    hidden, inter = args.hidden, 4 * args.hidden
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    moe = work / "moe"
    MixtralForCausalLM(config).save_pretrained(moe)
    tokenizer.save_pretrained(moe)
    tasks = list(zoo.task_names)
    calibration = calibration_file(zoo, tasks, 8, work / "calibration.jsonl")
    spec = CompressSpec(
        method="mc_smoe",
        experts=4,
        calibration=str(calibration),
        calibration_samples=8 * len(tasks),
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    runs = {}
    for label in ("statistics computed", "statistics cached"):
        out = work / label.replace(" ", "-")
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, str(moe), str(out), spec.model_dump_json()],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        runs[label] = {
            **json.loads(done.stdout.strip().splitlines()[-1]),
            "seconds": time.perf_counter() - started,
        }
    report = read_report(str(work / "statistics-cached"))
    largest_group = max(len(g) for v in report["layers"].values() for g in v["groups"])
    with open_checkpoint(str(moe)) as ckpt:
        result = {
            "hidden": hidden,
            "intermediate": inter,
            "model_bytes": ckpt.nbytes,
            "largest_tensor_bytes": max(ckpt.info(n).nbytes for n in ckpt.names()),
            "largest_group": largest_group,
            "group_bytes": largest_group * 3 * hidden * inter * 4,
            "runs": runs,
        }
    shutil.rmtree(work, ignore_errors=True)
    return result


def memory_report(r: dict[str, Any]) -> str:
    mb = 1e6
    lines = [
        "# MC-SMoE: memory",
        "",
        f"A random float32 Mixtral (hidden {r['hidden']}, expert MLP {r['intermediate']}, 4 "
        f"layers, 8 experts, top-2; {r['model_bytes'] / mb:.1f} MB, largest tensor "
        f"{r['largest_tensor_bytes'] / mb:.1f} MB) merged to 4 experts per layer by "
        "`compress.method: mc_smoe`, each run in a fresh process, by "
        "`python benchmarks/compress_moe.py --memory`. `grown`: the peak RSS during the run "
        "above the RSS after imports. The largest group holds "
        f"{r['largest_group']} experts: {r['group_bytes'] / mb:.1f} MB of float32 expert "
        "weights.",
        "",
        "| run | RSS after imports | peak RSS | grown | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, run in r["runs"].items():
        grown = run["peak_rss"] - run["rss_after_imports"]
        lines.append(
            f"| {label} | {run['rss_after_imports'] / mb:.1f} MB | {run['peak_rss'] / mb:.1f} MB "
            f"| {grown / mb:.1f} MB | {run['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def summary(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per row: average accuracy, normalized accuracy, and the share of the MoE's average."""
    tasks, own = result["tasks"], result["own"]
    moe = mean(result["rows"][MOE]["scores"].values())
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
    built = result.get("subject", "built") == "built"
    # experts of a built MoE are named by their task; the zoo MoE's have no task
    experts = names if built else [f"E{e}" for e in range(len(result["frequency"]["0"]))]
    subject = (
        "the zoo's experts as one 8-expert MoE: `amalgam.moe.build_moe`, `gate_mode: hidden`, "
        f"top-2, routers from the first {result['prompts_per_expert']} train prompts per task"
        if built
        else "the zoo's own 8-expert Mixtral, trained from scratch on every task with a "
        f"load-balancing loss, top-2 ({result['moe_origin']})"
    )
    lines = [
        "# MC-SMoE: "
        + ("a FrankenMoE of the zoo's experts" if built else "the zoo's own MoE")
        + " with fewer experts per layer",
        "",
        f"Zoo `{result['zoo']}`, test split"
        + (f" (first {result['limit']} per task)" if result["limit"] else "")
        + f". The MoE: {subject}. Calibration for "
        f"routing statistics: the first {result['calibration_per_task']} train records of "
        f"each task (prompt + answer), {result['calibration_tokens']:,} tokens. "
        f"{result['machine']}; whole run {result['seconds']:.0f} s, peak RSS "
        f"{result['peak_rss_gb']:.2f} GB (scoring included). Produced by "
        "`python benchmarks/compress_moe.py"
        + ("" if built else " --subject zoo")
        + ("" if result["zoo"].startswith("full") else " --profile tiny")
        + "`.",
        "",
        "`mc_smoe`: the paper's merge (groups around the most used experts by router-logit "
        "similarity, members aligned by weight matching, frequency-weighted average; each "
        "group keeps its dominant expert's router row). Baselines on the same statistics: "
        "`drop` keeps the most used experts and drops the rest; `uniform` averages the same "
        "groups plainly, without alignment. `averaged router`: `router_fold: average`, a "
        "group's router row is its members' rows averaged with the merge's weights. "
        "`losparse r= d=`: MC-SMoE then its compress step, each merged expert weight as its "
        "rank-r SVD plus the d share of the residual's largest entries, stored compressed "
        "(bytes: the files exactly), scored after `amalgam decompress`. No distillation "
        "finetune anywhere.",
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
        "stored: the numbers a LoSparse folder holds (factors, kept residual values and "
        "their positions counted as one number each); bytes: the tensors written (for "
        "LoSparse: the compressed folder's files, headers and manifest included); units "
        "moved: intermediate units that weight matching put in another place, summed over "
        "layers and group members (0: every member already in its dominant's order).",
        "",
        "| model | experts per layer | parameters | stored | bytes | units moved by "
        "alignment | compress s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, row in rows.items():
        lines.append(
            f"| {label} | {row['experts']} | {row['params']:,} | "
            f"{row.get('params_stored', row['params']):,} | {row['bytes']:,} | "
            f"{row.get('units_moved', '')} | {row['seconds']:.1f} |"
        )
    lines += [
        "",
        "## Calibration routing and groups",
        "",
        "Share (%) of the top-2 selections each expert gets over the "
        "calibration tokens, and the groups (dominant expert first) at 4 and 2 experts.",
        "",
        "| layer | " + " | ".join(experts) + " | groups at 4 | groups at 2 |",
        "|---|" + "---:|" * len(experts) + "---|---|",
    ]
    for layer, freq in result["frequency"].items():
        groups = [rows[f"mc_smoe, {k} experts"]["groups"][layer] for k in TARGETS]
        named = [" / ".join("+".join(experts[e] for e in g) for g in gs) for gs in groups]
        lines.append(
            f"| {layer} | " + " | ".join(pct(f) for f in freq) + f" | {named[0]} | {named[1]} |"
        )
    lines += [
        "",
        "## Routing of the 8-expert MoE on the test prompts",
        "",
        "Per task (rows), the share (%) of top-2 slots each expert gets"
        + ("; **bold**: its own." if built else "."),
    ]
    for layer in range(len(next(iter(result["routing"].values())))):
        lines += ["", f"Layer {layer}:", ""]
        lines.append("| task | " + " | ".join(experts) + " |")
        lines.append("|---|" + "---:|" * len(experts))
        for i, task in enumerate(tasks):
            shares = result["routing"][task][layer]
            cells = [f"**{pct(s)}**" if built and j == i else pct(s) for j, s in enumerate(shares)]
            lines.append(f"| {names[i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Average accuracy against experts per layer, one line per method."""
    from amalgam.evaluate.plots import pyplot

    plt = pyplot()
    stats = summary(result)
    moe = stats[MOE]["avg"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in METHODS:
        ks = [8, *TARGETS]
        ys = [moe] + [stats[f"{label}, {k} experts"]["avg"] for k in TARGETS]
        ax.plot(ks, [100 * y for y in ys], marker="o", label=label)
    for label, row in result["rows"].items():
        if "losparse" in label:
            y = 100 * stats[label]["avg"]
            ax.scatter([row["experts"]], [y], marker="x", label=label.split(",")[0])
    own = mean(result["own"].values())
    ax.axhline(100 * own, color="grey", linestyle=":", label="dense experts, own task")
    ax.set_xticks([8, *TARGETS])
    ax.set_xlabel("experts per layer")
    ax.set_ylabel("average accuracy (%)")
    subject = "FrankenMoE" if result.get("subject", "built") == "built" else "zoo MoE"
    ax.set_title(f"MC-SMoE on the {subject} ({result['zoo']})")
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
    parser.add_argument("--subject", default="built", choices=["built", "zoo"])
    parser.add_argument("--zoo", default=None, help="a built zoo folder (default: the profile's)")
    parser.add_argument(
        "--losparse", default="32:0.05,16:0.05", help="rank:density settings at 4 experts"
    )
    parser.add_argument("--memory", action="store_true", help="measure peak RSS instead")
    parser.add_argument("--hidden", type=int, default=512, help="--memory: hidden size")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.memory:
        measured = memory(args)
        (RESULTS / "compress-memory.json").write_text(json.dumps(measured, indent=2) + "\n")
        (RESULTS / "compress-memory.md").write_text(memory_report(measured))
        print(memory_report(measured))
        return
    result = run(args)
    stem = "compress" + ("-zoo" if args.subject == "zoo" else "")
    stem += "" if result["zoo"].startswith("full") else "-tiny"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(report(result))
    plot(result, RESULTS / f"{stem}.png")
    print(report(result))


if __name__ == "__main__":
    main()
