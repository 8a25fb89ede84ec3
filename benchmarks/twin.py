"""Twin-Merging on the zoo: normalized accuracy of Twin at several SVD ranks against task
arithmetic and TIES in the same run, stored bytes against the experts, the router's task
accuracy and its cost per example.

Every model is scored with the quick scorer (lm-eval's `acc`) on each task's test split;
normalized accuracy is accuracy / the task's own expert's accuracy, averaged over tasks. The
Twin folders share one shared model (task arithmetic, lambda 0.3, the paper's default),
merged once and reused. Costs are per example on CPU: the routing feature (one batched
forward pass of the shared model), the router's softmax, mixing theta* + sum_t w_t delta_t
into the model's weights, and the whole per-example scoring against the shared model scored
in batches. Writes `results/twin.{md,json,png}` (`twin-full.*` for the full zoo).

    python benchmarks/twin.py                  # tiny zoo, ranks 2, 8, 32, share 0.1 (< 1 min)
    python benchmarks/twin.py --profile full   # the full zoo (about 3 CPU minutes)
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path
from statistics import mean
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "twin"
MERGES = {
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"density": 0.2, "lambda": 1.0},
}


def normalized(scores: dict[str, float], own: dict[str, float]) -> float:
    return mean(scores[t] / own[t] if own[t] else 0.0 for t in own)


def recipe(zoo: Any, method: str) -> Any:
    from amalgam.recipe import ModelSpec, Recipe

    models = [ModelSpec(uri=str(p), name=t) for t, p in zoo.experts.items()]
    return Recipe(
        method=method, base=str(zoo.base), models=models, params=MERGES[method], dtype="float32"
    )


def score(folder: Path, zoo: Any, limit: int | None) -> tuple[dict[str, float], float]:
    """Task -> accuracy of a plain model folder, and its scoring ms per example."""
    from amalgam.device import load_causal_lm
    from amalgam.evaluate.quick import quick_evaluate

    model, tokenizer = load_causal_lm(folder, "cpu")
    start = time.perf_counter()
    scores = quick_evaluate(model, tokenizer, zoo.tasks_dir, zoo.task_names, limit=limit)
    return scores, 1000 * (time.perf_counter() - start) / examples(zoo, limit)


def examples(zoo: Any, limit: int | None) -> int:
    from amalgam.evaluate.taskdir import read_split

    return sum(len(read_split(zoo.tasks_dir, t, "test")[:limit]) for t in zoo.task_names)


def twin_costs(folder: Path, zoo: Any, limit: int | None) -> dict[str, Any]:
    """Accuracy per task and per-example costs of one Twin folder."""
    from amalgam.evaluate.taskdir import read_split
    from amalgam.twin.model import TwinModel
    from amalgam.twin.router import prompt_features

    twin = TwinModel(folder)
    records = {t: read_split(zoo.tasks_dir, t, "test")[:limit] for t in zoo.task_names}
    prompts = [r["prompt"] for rs in records.values() for r in rs]
    start = time.perf_counter()
    features = prompt_features(twin.model, twin.tokenizer, prompts)
    feature_ms = 1000 * (time.perf_counter() - start) / len(prompts)
    start = time.perf_counter()
    weights = twin.router.weights(features)
    router_ms = 1000 * (time.perf_counter() - start) / len(prompts)
    start = time.perf_counter()
    for row in weights[:200]:
        twin.load_weights(row)
    mix_ms = 1000 * (time.perf_counter() - start) / min(200, len(weights))
    start = time.perf_counter()
    correct = {t: twin.correct(rs) for t, rs in records.items()}
    total_ms = 1000 * (time.perf_counter() - start) / len(prompts)
    labels = torch.tensor([twin.tasks.index(t) for t, rs in records.items() for _ in rs])
    return {
        "test": {t: sum(c) / len(c) for t, c in correct.items()},
        "router_test_accuracy": float((weights.argmax(-1) == labels).float().mean()),
        "ms_per_example": {
            "routing_feature": feature_ms,
            "router": router_ms,
            "mix_weights": mix_ms,
            "twin_scoring_total": total_ms,
        },
    }


def run(
    profile: str,
    ranks: list[int],
    shares: list[float],
    limit: int | None,
    threads: int,
    work: Path = WORK,
) -> dict[str, Any]:
    """Score the experts, TA, TIES and Twin at each rank and share; the rows and figures."""
    from amalgam.engine import MergeOptions, run_merge
    from amalgam.twin.build import build_twin
    from amalgam.twin.spec import TwinSpec
    from amalgam.zoo import build_zoo

    torch.set_num_threads(threads)
    zoo = build_zoo(profile=profile, log=print)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    options = MergeOptions(device="cpu", threads=threads, overwrite=True)
    own = {}
    for task, folder in zoo.experts.items():
        own[task] = score(folder, zoo, limit)[0][task]
    rows: dict[str, Any] = {}
    for method in MERGES:
        out = work / method
        run_merge(recipe(zoo, method), options.model_copy(update={"output": str(out)}))
        test, ms = score(out, zoo, limit)
        bytes_ = (out / "model.safetensors").stat().st_size
        rows[method] = {"test": test, "ms_per_example": {"scoring": ms}, "stored_bytes": bytes_}
    settings = [{"rank": r} for r in ranks] + [{"share": s} for s in shares]
    for setting in settings:
        spec = TwinSpec(**setting, tasks_dir=str(zoo.tasks_dir), shared_output=str(work / "shared"))
        ((key, value),) = setting.items()
        out = work / f"twin-{key}{value}"
        start = time.perf_counter()
        built = build_twin(recipe(zoo, "task_arithmetic"), spec, str(out), options=options)
        seconds = time.perf_counter() - start
        row = twin_costs(out, zoo, limit)
        rows[f"twin {key}={value}"] = row | {
            "stored_bytes": built.stored_bytes,
            "shared_bytes": built.shared_bytes,
            "factor_bytes": built.factor_bytes,
            "router_bytes": built.router_bytes,
            "router_held_out_accuracy": built.router_accuracy,
            "build_seconds": seconds,
        }
    experts_bytes = built.experts_bytes
    for row in rows.values():
        row["average"] = mean(row["test"].values())
        row["normalized"] = normalized(row["test"], own)
        row["bytes_vs_experts"] = row["stored_bytes"] / experts_bytes
    return {
        "profile": profile,
        "zoo": zoo.hash,
        "tasks": zoo.task_names,
        "limit": limit,
        "own": own,
        "experts_bytes": experts_bytes,
        "rows": rows,
        "machine": f"{platform.machine()}, torch {torch.__version__}, {threads} thread(s)",
    }


def markdown(result: dict[str, Any]) -> str:
    tasks = result["tasks"]
    lines = [
        f"# Twin-Merging on the {result['profile']} zoo",
        "",
        f"`python benchmarks/twin.py --profile {result['profile']}`; {result['machine']}. "
        "Test-split accuracy (%) by the quick scorer; normalized = mean over tasks of "
        "accuracy / the task's own expert's accuracy. Twin: shared model = task arithmetic "
        "(lambda 0.3), each expert's difference to it at SVD rank r per 2-D tensor (or the "
        "paper's share of each tensor's min(m, n)), 1-D tensors dense, router = logistic "
        "regression on the shared model's mean last hidden state (64 train records per task).",
        "",
        "| model | " + " | ".join(tasks) + " | average | normalized | stored bytes | x experts |",
        "|---|" + "---:|" * (len(tasks) + 4),
        "| expert (own task) | "
        + " | ".join(f"{100 * result['own'][t]:.1f}" for t in tasks)
        + f" | {100 * mean(result['own'].values()):.1f} | 100.0 | "
        f"{result['experts_bytes']:,} | 1.000 |",
    ]
    for name, row in result["rows"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * row['test'][t]:.1f}" for t in tasks)
            + f" | {100 * row['average']:.1f} | {100 * row['normalized']:.1f} | "
            f"{row['stored_bytes']:,} | {row['bytes_vs_experts']:.3f} |"
        )
    lines += [
        "",
        "## Twin: storage and cost per example",
        "",
        "| setting | shared bytes | factor bytes | router bytes | router acc. (held-out val / test)"
        " | feature ms | router ms | mix ms | Twin scoring ms | plain TA scoring ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ta_ms = result["rows"]["task_arithmetic"]["ms_per_example"]["scoring"]
    for name, row in result["rows"].items():
        if not name.startswith("twin"):
            continue
        ms = row["ms_per_example"]
        lines.append(
            f"| {name.removeprefix('twin ')} | {row['shared_bytes']:,} | {row['factor_bytes']:,} | "
            f"{row['router_bytes']:,} | {100 * row['router_held_out_accuracy']:.1f} / "
            f"{100 * row['router_test_accuracy']:.1f} | {ms['routing_feature']:.3f} | "
            f"{ms['router']:.4f} | {ms['mix_weights']:.3f} | {ms['twin_scoring_total']:.2f} | "
            f"{ta_ms:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Normalized accuracy against stored bytes (share of the experts' bytes), one point per
    model, the experts themselves at (1, 100)."""
    from amalgam.evaluate.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    points = {"experts": (1.0, 100.0)} | {
        name: (row["bytes_vs_experts"], 100 * row["normalized"])
        for name, row in result["rows"].items()
    }
    for name, (x, y) in points.items():
        ax.scatter(x, y, color="tab:blue" if name.startswith("twin") else "tab:gray")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.set_xlabel("stored bytes / the experts' bytes")
    ax.set_ylabel("normalized accuracy (%)")
    ax.set_title(f"Twin-Merging on the {result['profile']} zoo ({len(result['tasks'])} tasks)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict[str, Any]) -> str:
    """Write ``results/twin[-<profile>].{json,md,png}``; the markdown."""
    stem = "twin" if result["profile"] == "tiny" else f"twin-{result['profile']}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / f"{stem}.png")
    text = markdown(result) + f"\n![normalized accuracy against bytes]({stem}.png)\n"
    (RESULTS / f"{stem}.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny", help="zoo profile: tiny | full")
    parser.add_argument("--ranks", default="2,8,32", help="comma-separated SVD ranks")
    parser.add_argument("--shares", default="0.1", help="kept shares of min(m, n) (paper: 0.1)")
    parser.add_argument("--limit", type=int, default=None, help="test records per task")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    shares = [float(x) for x in args.shares.split(",") if x]
    result = run(args.profile, ranks, shares, args.limit, args.threads)
    print(write(result))


if __name__ == "__main__":
    main()
