"""Adapter outputs on the zoo: task arithmetic over the zoo's LoRA adapters written as a dense
model and as one adapter (concat, svd and LoRA-LEGO at ranks r, 2r, 4r, r the adapters' rank).

Each output is merged through `amalgam.adapters.adapter_output.merge_recipe`, loaded the way
`amalgam evaluate` loads it (an adapter over its base) and scored with the quick evaluator on
every task (test split); accuracy is normalized by each task's own adapter. Prints a markdown
table: mean accuracy, mean normalized accuracy, output size, merge time.

    python benchmarks/adapter_outputs.py                    # full zoo
    python benchmarks/adapter_outputs.py --profile tiny --limit 64
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "adapter_outputs"


def accuracy(folder: Path, zoo, tasks: list[str], limit: int | None) -> dict[str, float]:
    from amalgam.device import load_causal_lm
    from amalgam.evaluate.quick import quick_evaluate

    model, tokenizer = load_causal_lm(folder, "cpu")
    return quick_evaluate(model, tokenizer, zoo.tasks_dir, tasks, limit=limit)


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging

    from amalgam.adapters.adapter_output import merge_recipe
    from amalgam.recipe import parse_recipe
    from amalgam.zoo import build_zoo, default_zoo_dir

    logging.disable_progress_bar()

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="full")
    ap.add_argument("--limit", type=int, default=None, help="examples per task")
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0)
    args = ap.parse_args(argv)
    zoo = build_zoo(default_zoo_dir(), profile=args.profile, log=lambda _: None)
    tasks = sorted(zoo.loras)
    rank = json.loads((zoo.loras[tasks[0]] / "adapter_config.json").read_text())["r"]
    experts = {t: accuracy(zoo.loras[t], zoo, [t], args.limit)[t] for t in tasks}
    base = {
        "method": "task_arithmetic",
        "base": str(zoo.base),
        "models": [{"uri": str(zoo.loras[t])} for t in tasks],
        "params": {"lambda": args.lam},
        "dtype": "float32",
    }
    rows = [("dense", {})]
    rows += [("concat", {"output_format": "adapter"})]
    for how in ("svd", "lora_lego"):
        for k in (rank, 2 * rank, 4 * rank):
            spec = {"method": how, "rank": k}
            rows.append((f"{how} r{k}", {"output_format": "adapter", "adapter_output": spec}))
    print(
        f"zoo {zoo.root.name}, task arithmetic (lambda {args.lam}) over {len(tasks)} "
        f"LoRA adapters of rank {rank}; quick evaluator, limit {args.limit}\n"
    )
    print("| output | mean accuracy | mean normalized | size (MB) | merge (s) |")
    print("|---|---|---|---|---|")
    for label, extra in rows:
        out = WORK / zoo.hash / label.replace(" ", "-")
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        merge_recipe(parse_recipe({**base, **extra, "output": str(out)}))
        seconds = time.perf_counter() - start
        acc = accuracy(out, zoo, tasks, args.limit)
        norm = mean(acc[t] / experts[t] for t in tasks if experts[t] > 0)
        print(
            f"| {label} | {mean(acc.values()):.3f} | {norm:.3f} | {size(out) / 1e6:.2f} | "
            f"{seconds:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
