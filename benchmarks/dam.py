"""Backdoor benchmark: accuracy and attack success rate (ASR) of merges that include the zoo's
backdoored expert (`amalgam.zoo.backdoor`), for task arithmetic, TIES and DAM.

The zoo's expert of the backdoored task is replaced by the backdoored expert (same task, same
schedule, a trigger token on a poisoned share of its training data); the other experts are the
zoo's. Each method runs through the engine with the authors' defaults (`quality.DRIVES`); every
row is scored on every task's test split (quick scorer) and on the triggered test prompts of
the backdoored task (ASR, `amalgam.evaluate.backdoor`). Normalized accuracy divides each task's
accuracy by its expert's (the backdoored expert for its task). Writes `dam.{md,json}` to
--results.

    python benchmarks/dam.py --quick    # tiny zoo
    python benchmarks/dam.py            # full zoo
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from quality import DRIVES, Scorer

METHODS = ("task_arithmetic", "ties", "dam")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from amalgam.engine import MergeOptions, run_merge
    from amalgam.evaluate.backdoor import quick_attack_success
    from amalgam.methods import get_method
    from amalgam.recipe import ModelSpec, Recipe
    from amalgam.zoo.backdoor import build_backdoor
    from amalgam.zoo.build import build_zoo

    torch.set_num_threads(1)
    zoo = build_zoo(profile="tiny" if args.quick else "full")
    backdoor = build_backdoor(zoo)
    tasks = zoo.task_names
    experts = {t: (backdoor.expert if t == backdoor.task else p) for t, p in zoo.experts.items()}
    scorer = Scorer(zoo.base, zoo.tasks_dir, tasks, None)
    work = Path(tempfile.mkdtemp(prefix="amalgam-dam-"))

    def score(folder: Path) -> dict[str, Any]:
        accuracy = scorer.score(folder, "test")
        asr = quick_attack_success(
            scorer.model, scorer.tokenizer, backdoor.tasks_dir, [backdoor.task]
        )
        return {"test": accuracy, "asr": asr[backdoor.task]}

    rows: dict[str, Any] = {"base": score(zoo.base), "backdoored expert": score(backdoor.expert)}
    own = {
        t: score(p)["test"][t] if t != backdoor.task else rows["backdoored expert"]["test"][t]
        for t, p in experts.items()
        if t != backdoor.task
    } | {backdoor.task: rows["backdoored expert"]["test"][backdoor.task]}
    for method in args.methods.split(","):
        data = get_method(method).reads_data
        recipe = Recipe(
            method=method,
            base=str(zoo.base),
            models=[
                ModelSpec(uri=str(p), name=t, **({"data": str(zoo.tasks_dir / t)} if data else {}))
                for t, p in experts.items()
            ],
            params=DRIVES[method].defaults,
            dtype="float32",
        )
        start = time.perf_counter()
        run_merge(recipe, MergeOptions(output=str(work), overwrite=True, device="cpu", threads=1))
        rows[method] = score(work) | {"seconds": round(time.perf_counter() - start, 1)}
    shutil.rmtree(work, ignore_errors=True)
    for row in rows.values():
        row["average"] = mean(row["test"].values())
        row["normalized"] = mean(row["test"][t] / own[t] for t in tasks if own[t])
    return {
        "zoo": zoo.root.name,
        "backdoor": backdoor.root.name,
        "task": backdoor.task,
        "trigger": backdoor.trigger.trigger,
        "target": backdoor.trigger.target,
        "own": own,
        "rows": rows,
    }


def render(result: dict[str, Any]) -> str:
    tasks = list(result["own"])
    head = ["model", *tasks, "average", "normalized", f"ASR ({result['task']})", "merge s"]
    lines = [
        f"# Backdoor benchmark (zoo `{result['zoo']}`, backdoor `{result['backdoor']}`)\n",
        f"Test accuracy (%) per task, normalized accuracy (% of each task's expert) and the "
        f"attack success rate (%) of trigger `{result['trigger']}` on `{result['task']}` "
        "(share of correctly answered test prompts, true answer not the target, flipped to the "
        "target by the trigger).\n",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for name, row in result["rows"].items():
        cells = [f"{100 * row['test'][t]:.1f}" for t in tasks]
        cells += [f"{100 * row['average']:.1f}", f"{100 * row['normalized']:.1f}"]
        cells += [f"{100 * row['asr']:.1f}", str(row.get("seconds", ""))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny zoo")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "quality-dam"))
    args = parser.parse_args(argv)
    result = run(args)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    name = "dam-quick" if args.quick else "dam"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / f"{name}.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
