"""Layer swapping on the zoo: which layers carry a task. Two full fine-tunes of the zoo's base,
a *kept* expert and a *donor*; each row swaps the donor's bottom and/or top layers into the kept
expert (``layer_swap``, arXiv 2410.01335) and scores both tasks (quick scorer, test split).
Task arithmetic of the two (lambda 1) is the merge baseline. Writes
results/layer-swap.{md,json}.

    python benchmarks/layer_swap.py [--kept zoo_sort] [--donor zoo_caesar] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import quality  # noqa: E402  (a sibling script, not a package)

RESULTS = ROOT / "benchmarks" / "results"
# (bottom, top) layers from the donor; those that leave no layer of the kept expert are skipped
SWAPS = [(1, 0), (0, 1), (1, 1), (2, 0), (0, 2), (2, 1), (1, 2)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kept", default="zoo_sort")
    ap.add_argument("--donor", default="zoo_caesar")
    ap.add_argument("--profile", default="full")
    ap.add_argument("--limit", type=int, default=None, help="examples per task")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from amalgam.engine import MergeOptions, run_merge
    from amalgam.recipe import parse_recipe
    from amalgam.zoo import build_zoo, default_zoo_dir

    zoo = build_zoo(default_zoo_dir(), profile=args.profile, log=lambda m: None)
    tasks = [args.kept, args.donor]
    scorer = quality.Scorer(zoo.base, zoo.tasks_dir, tasks, args.limit)
    kept, donor = zoo.experts[args.kept], zoo.experts[args.donor]
    models = [{"uri": str(kept), "name": "kept"}, {"uri": str(donor), "name": "donor"}]
    rows: dict[str, Any] = {}
    for label, folder in (("base", zoo.base), ("kept expert", kept), ("donor expert", donor)):
        rows[label] = {"test": scorer.score(folder, "test")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "merge"
        recipes = {
            "task arithmetic (lambda 1)": {"method": "task_arithmetic", "base": str(zoo.base)}
        }
        layers = json.loads((zoo.base / "config.json").read_text())["num_hidden_layers"]
        for bottom, top in (s for s in SWAPS if sum(s) < layers):
            swap = {"model": "donor", "bottom": bottom, "top": top}
            recipes[f"swap: donor's bottom {bottom}, top {top}"] = {
                "method": "passthrough",
                "layer_swap": swap,
            }
        for label, extra in recipes.items():
            start = time.perf_counter()
            recipe = parse_recipe({"models": models, **extra})
            run_merge(
                recipe, MergeOptions(output=str(out), overwrite=True, device="cpu", threads=1)
            )
            rows[label] = {
                "merge_seconds": time.perf_counter() - start,
                "test": scorer.score(out, "test"),
            }
            print(label, rows[label]["test"], file=sys.stderr, flush=True)
    result = {
        "zoo": zoo.root.name,
        "layers": layers,
        "kept": args.kept,
        "donor": args.donor,
        "limit": args.limit,
        "rows": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "layer-swap.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Layer swapping on the zoo",
        "",
        f"Zoo `{zoo.root.name}` ({layers} layers); kept expert `{args.kept}`, donor "
        f"`{args.donor}`; accuracy on the test split (quick scorer). Command: "
        "`python benchmarks/layer_swap.py`.",
        "",
        f"| model | {args.kept} | {args.donor} | merge s |",
        "|---|---|---|---|",
    ]
    for label, row in rows.items():
        t = row["test"]
        secs = f"{row['merge_seconds']:.1f}" if "merge_seconds" in row else ""
        lines.append(f"| {label} | {t[args.kept]:.3f} | {t[args.donor]:.3f} | {secs} |")
    (args.results / "layer-swap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
