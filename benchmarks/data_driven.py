"""Fisher merging and RegMean on the zoo's eight experts against task arithmetic.

Each expert's data is its own task folder (validation split); merges are scored on the test
split with the quick scorer. Prints a JSON report (accuracy, normalized accuracy, statistics
time per model). Usage: python benchmarks/data_driven.py ZOO_FOLDER [OUT_FOLDER]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amalgam.engine import MergeOptions, run_merge
from amalgam.evaluate.quick import quick_evaluate
from amalgam.recipe import parse_recipe
from amalgam.statistics import cached_statistics
from amalgam.zoo import Zoo

TA_LAMBDAS = (0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
REGMEAN_ALPHAS = (0.1, 0.5, 0.9, 1.0)


def score(folder: Path, zoo: Zoo, split: str) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    return quick_evaluate(model, tokenizer, zoo.tasks_dir, zoo.task_names, split=split)


def merge(zoo: Zoo, out: Path, method: str, params: dict[str, Any], data: bool) -> Path:
    models = [
        {"uri": str(path), **({"data": str(zoo.tasks_dir / task)} if data else {})}
        for task, path in zoo.experts.items()
    ]
    recipe = {"method": method, "models": models, "params": params, "output": str(out)}
    if method == "task_arithmetic":
        recipe["base"] = str(zoo.base)
    run_merge(parse_recipe(recipe), MergeOptions(overwrite=True, threads=1))
    return out


def summary(acc: dict[str, float], expert: dict[str, float]) -> dict[str, float]:
    return {
        "accuracy": sum(acc.values()) / len(acc),
        "normalized": sum(acc[t] / expert[t] for t in acc) / len(acc),
    }


def main(zoo_dir: str, out_dir: str | None = None) -> None:
    torch.set_num_threads(1)
    zoo = Zoo.load(Path(zoo_dir))
    out = Path(out_dir or tempfile.mkdtemp(prefix="data-driven-"))
    report: dict[str, Any] = {"zoo": str(zoo.root), "statistics_seconds": {}}
    kinds = (
        ("fisher", {"samples": 256, "fisher": "sampled"}),
        ("fisher", {"samples": 256, "fisher": "empirical"}),
        ("gram", {"samples": 256}),
    )
    for kind, settings in kinds:
        for task, path in zoo.experts.items():
            start = time.perf_counter()
            data = str(zoo.tasks_dir / task)
            _, computed = cached_statistics(str(path), data, kind, settings, threads=1)
            if computed:
                key = f"{kind}:{settings.get('fisher', '')}:{task}"
                report["statistics_seconds"][key] = round(time.perf_counter() - start, 2)
    expert = {t: score(p, zoo, "test")[t] for t, p in zoo.experts.items()}
    report["experts"] = expert

    def best_on_validation(method: str, key: str, values: tuple, data: bool) -> tuple[str, Path]:
        best: tuple[float, float, Path] | None = None
        for v in values:
            folder = merge(zoo, out / f"{method}-{key}-{v}", method, {key: v}, data)
            val = sum(score(folder, zoo, "validation").values())
            if best is None or val > best[0]:
                best = (val, v, folder)
        assert best is not None
        return f"{method} ({key} {best[1]}, chosen on validation)", best[2]

    rows = dict([best_on_validation("task_arithmetic", "lambda", TA_LAMBDAS, False)])
    rows["fisher (defaults)"] = merge(zoo, out / "fisher", "fisher", {}, True)
    rows["fisher (empirical)"] = merge(
        zoo, out / "fisher-e", "fisher", {"fisher": "empirical"}, True
    )
    rows["regmean (defaults)"] = merge(zoo, out / "regmean", "regmean", {}, True)
    rows.update([best_on_validation("regmean", "alpha", REGMEAN_ALPHAS, True)])
    report["merges"] = {}
    for name, folder in rows.items():
        acc = score(folder, zoo, "test")
        report["merges"][name] = {**summary(acc, expert), "per_task": acc}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
