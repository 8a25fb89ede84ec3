"""Backdoor benchmark: accuracy and attack success rate (ASR) of merges that include the zoo's
backdoored expert (`amalgam.zoo.backdoor`), for every registered per-tensor method that merges
all experts, and DAM.

The zoo's expert of the backdoored task is replaced by the backdoored expert (same task, same
schedule, a trigger token on a poisoned share of its training data); the other experts are the
zoo's. Each method runs through the engine with the authors' defaults (`quality.DRIVES`); every
row is scored on every task's --split (quick scorer) and on the triggered prompts of the
backdoored task's same split (ASR, `amalgam.evaluate.backdoor`). Normalized accuracy divides
each task's accuracy by its expert's (the backdoored expert for its task). `--dam JSON` adds a
DAM row with those parameters over the defaults (repeatable: a sweep); DAM rows also report the
share of the backdoored expert's task vector their mask removes (entries, and squared norm).
Writes `dam[-quick][-<split>].{md,json}` to --results (no suffix for the test split).

    python benchmarks/dam.py --quick                     # tiny zoo, every method
    python benchmarks/dam.py --methods task_arithmetic,ties,dam --split validation \
        --dam '{"drop": 2.0}' --dam '{"min_gain": 0.6}'  # a DAM sweep on validation
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

from quality import DRIVES, Scorer, drive_for, load_state


def default_methods() -> list[str]:
    """Every registered per-tensor method the quality benchmark runs on all experts, and DAM."""
    from amalgam.methods.base import REGISTRY

    names = [
        n
        for n, m in sorted(REGISTRY.items())
        if (d := drive_for(n, m)).kind == "per_tensor" and d.skip is None
    ]
    return [*names, "dam"]


def removed_share(folder: Path, expert: Path, base: Path, index: int) -> dict[str, float]:
    """Share of model ``index``'s task vector (entries, squared norm) that the DAM masks behind
    the merged ``folder`` leave out; the masks are found by the content hashes the merge
    records in its shards' metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from amalgam.statistics.artifact import read_info
    from amalgam.storage import amalgam_home

    shard = next(iter(sorted(folder.glob("*.safetensors"))))
    with safe_open(str(shard), "pt") as f:
        provenance = (f.metadata() or {})["statistics"]
    wanted = provenance.split(";")[index].split("=", 1)[1]
    stats = amalgam_home() / "statistics"
    path = next(
        p for p in stats.glob("dam_mask-*.safetensors") if read_info(str(p)).content_hash == wanted
    )
    masks, w0, w1 = load_file(path), load_state(base), load_state(expert)
    entries = dropped = norm = dropped_norm = 0.0
    for name, mask in masks.items():
        tv = (w1[name].float() - w0[name].float()) ** 2
        out = mask.float() == 0
        entries += mask.numel()
        dropped += float(out.sum())
        norm += float(tv.sum())
        dropped_norm += float(tv[out].sum())
    return {"entries": dropped / entries, "norm": dropped_norm / norm if norm else 0.0}


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
        accuracy = scorer.score(folder, args.split)
        asr = quick_attack_success(
            scorer.model, scorer.tokenizer, backdoor.tasks_dir, [backdoor.task], split=args.split
        )
        return {"accuracy": accuracy, "asr": asr[backdoor.task]}

    rows: dict[str, Any] = {"base": score(zoo.base), "backdoored expert": score(backdoor.expert)}
    own = {t: score(p)["accuracy"][t] for t, p in experts.items() if t != backdoor.task} | {
        backdoor.task: rows["backdoored expert"]["accuracy"][backdoor.task]
    }
    methods = args.methods.split(",") if args.methods else default_methods()
    runs = [(m, m, drive_for(m, get_method(m)).defaults) for m in methods]
    for extra in args.dam:
        label = "dam (" + ", ".join(f"{k} {v}" for k, v in extra.items()) + ")"
        runs.append((label, "dam", {**DRIVES["dam"].defaults, **extra}))
    for label, method, params in runs:
        data = get_method(method).reads_data
        recipe = Recipe(
            method=method,
            base=str(zoo.base),
            models=[
                ModelSpec(uri=str(p), name=t, **({"data": str(zoo.tasks_dir / t)} if data else {}))
                for t, p in experts.items()
            ],
            params=params,
            dtype="float32",
        )
        start = time.perf_counter()
        run_merge(recipe, MergeOptions(output=str(work), overwrite=True, device="cpu", threads=1))
        rows[label] = score(work) | {"seconds": round(time.perf_counter() - start, 1)}
        if method == "dam":
            index = list(experts).index(backdoor.task)
            rows[label]["removed"] = removed_share(work, backdoor.expert, zoo.base, index)
        print(label, rows[label], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    for row in rows.values():
        row["average"] = mean(row["accuracy"].values())
        row["normalized"] = mean(row["accuracy"][t] / own[t] for t in tasks if own[t])
    return {
        "zoo": zoo.root.name,
        "backdoor": backdoor.root.name,
        "task": backdoor.task,
        "split": args.split,
        "trigger": backdoor.trigger.trigger,
        "target": backdoor.trigger.target,
        "own": own,
        "rows": rows,
    }


def render(result: dict[str, Any]) -> str:
    tasks = list(result["own"])
    task = result["task"]
    head = ["model", *tasks, "average", "normalized", f"ASR ({task})", "merge s", "removed"]
    lines = [
        f"# Backdoor benchmark (zoo `{result['zoo']}`, backdoor `{result['backdoor']}`)\n",
        f"Accuracy (%) per task on the {result['split']} split, normalized accuracy (% of each "
        f"task's expert) and the attack success rate (%) of trigger `{result['trigger']}` on "
        f"`{task}` (share of correctly answered prompts, true answer not the target, flipped to "
        "the target by the trigger). `removed`: share (%) of the backdoored expert's task "
        "vector that DAM's mask leaves out, entries / squared norm.\n",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for name, row in result["rows"].items():
        cells = [f"{100 * row['accuracy'][t]:.1f}" for t in tasks]
        cells += [f"{100 * row['average']:.1f}", f"{100 * row['normalized']:.1f}"]
        cells += [f"{100 * row['asr']:.1f}", str(row.get("seconds", ""))]
        removed = row.get("removed")
        cells.append(
            f"{100 * removed['entries']:.1f} / {100 * removed['norm']:.1f}" if removed else ""
        )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny zoo")
    parser.add_argument(
        "--methods", default="", help="comma-separated (default: every per-tensor method, dam)"
    )
    parser.add_argument("--split", default="test", choices=("validation", "test"))
    parser.add_argument(
        "--dam",
        action="append",
        type=json.loads,
        default=[],
        help="a DAM row with these parameters (JSON) over the defaults; repeatable",
    )
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "quality-dam"))
    args = parser.parse_args(argv)
    result = run(args)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    name = ("dam-quick" if args.quick else "dam") + (
        "" if args.split == "test" else f"-{args.split}"
    )
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / f"{name}.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
