"""Quality of the subspace merges (TSV-M, PCB, Consensus) against task arithmetic and TIES on
the zoo's eight experts: lambda chosen on the validation split, accuracy on the test split."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

EMBEDDINGS_MEAN = [{"match": "embed_tokens|lm_head", "params": {"svd": "none"}}]
# method, params, overrides, lambda grid searched on validation
GRIDS: list[tuple[str, dict, list, list[float]]] = [
    ("task_arithmetic", {}, [], [0.05, 0.1, 0.15, 0.2, 0.3, 0.5]),
    ("ties", {"density": 0.2}, [], [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]),
    ("tsv_m", {}, [], [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]),
    ("tsv_m", {}, EMBEDDINGS_MEAN, [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]),
    ("tsv_m", {"svd": "lowrank"}, [], [0.1, 0.2, 0.3, 0.5]),
    ("pcb", {}, [], [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]),
    ("pcb", {"scope": "model"}, [], [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]),
    ("consensus_ta", {}, [], [0.05, 0.1, 0.2, 0.3, 0.5, 0.7]),
    ("consensus_ties", {}, [], [0.05, 0.1, 0.2, 0.3, 0.5, 0.7]),
]


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amalgam.engine import MergeOptions, run_merge
    from amalgam.evaluate.quick import quick_evaluate
    from amalgam.recipe import parse_recipe

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("zoo", type=Path, help="a built zoo folder (base, experts/, tasks/)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/subspace_zoo.json"))
    parser.add_argument("--methods", default=None, help="comma-separated subset of methods")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = json.loads((args.zoo / "report.json").read_text())
    tasks = list(report["accuracy"]["base"])
    expert = {t: report["accuracy"][f"expert:{t}"][t] for t in tasks}
    tokenizer = AutoTokenizer.from_pretrained(args.zoo / "base")
    wanted = set(args.methods.split(",")) if args.methods else None
    base_test = report["accuracy"]["base"]
    results = [
        {
            "method": "base (no merge)",
            "test": base_test,
            "test_avg": sum(base_test.values()) / len(tasks),
            "normalized_avg": sum(base_test[t] / expert[t] for t in tasks) / len(tasks),
        }
    ]

    def score(folder: Path, split: str) -> dict[str, float]:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return quick_evaluate(model, tokenizer, args.zoo / "tasks", tasks, split=split)

    def merge(method: str, params: dict, overrides: list, out: Path) -> float:
        recipe = parse_recipe(
            {
                "method": method,
                "base": str(args.zoo / "base"),
                "models": [{"uri": str(args.zoo / "experts" / t)} for t in tasks],
                "params": params,
                "overrides": overrides,
                "dtype": "float32",
                "output": str(out),
            }
        )
        started = time.perf_counter()
        run_merge(recipe, MergeOptions(device="cpu", overwrite=True, threads=1))
        return time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "merged"
        for method, extra, overrides, grid in GRIDS:
            if wanted and method not in wanted:
                continue
            search = []
            for lam in grid:
                seconds = merge(method, {**extra, "lambda": lam}, overrides, out)
                val = score(out, "validation")
                search.append((sum(val.values()) / len(val), lam, seconds))
                print(f"{method} {extra} lambda={lam}: val {search[-1][0]:.4f} ({seconds:.2f} s)")
            best_val, lam, _ = max(search, key=lambda s: (s[0], -s[1]))
            merge(method, {**extra, "lambda": lam}, overrides, out)
            test = score(out, "test")
            row = {
                "method": method,
                "params": extra,
                "overrides": overrides,
                "val_curve": {str(s[1]): s[0] for s in search},
                "lambda": lam,
                "val_avg": best_val,
                "test": test,
                "test_avg": sum(test.values()) / len(test),
                "normalized_avg": sum(test[t] / expert[t] for t in tasks) / len(tasks),
                "merge_seconds_median": sorted(s[2] for s in search)[len(search) // 2],
            }
            results.append(row)
            print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"zoo": str(args.zoo), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
