"""Search benchmark: evolutionary recipe search (CMA-ES, `amalgam search`) against the best
grid-sweep point of the same method, on the zoo, with the held-out split reported.

Task arithmetic over the zoo's experts: the grid sweeps its lambda (weights 1, the quality
benchmark's grid) and picks the point best on the validation split; the search tunes one
weight per expert (lambda 1, starting at task arithmetic's default lambda 0.3 as weights) on
the same validation records. Both are reported on the test split, which neither saw. The
search runs twice on Ray in the same run, with 1 and with 2 workers (candidates scored at a
time); the two must give the same trials. A greedy soup of the same experts (`amalgam soup`,
chosen on the same validation records) is reported beside them. Writes
`results/search.{md,json}`.

    python benchmarks/search.py            # full zoo, 8 experts, 8 generations (minutes)
    python benchmarks/search.py --quick    # tiny zoo, 4 experts, 4 generations
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "search"
#: The quality benchmark's lambda grid for task arithmetic (summed task vectors).
SUM_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def recipe_data(zoo: Any, tasks: list[str], weight: float, lam: float) -> dict:
    return {
        "method": "task_arithmetic",
        "base": str(zoo.base),
        "models": [{"uri": str(zoo.experts[t]), "params": {"weight": weight}} for t in tasks],
        "params": {"lambda": lam},
        "dtype": "float32",
        "evaluate": {"tasks_dir": str(zoo.tasks_dir), "tasks": tasks, "engine": "quick"},
    }


def mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    import torch

    from amalgam.pipeline_config import Grid
    from amalgam.recipe import parse_recipe
    from amalgam.search.evolve import run_search
    from amalgam.search.soup import run_soup, soup_recipe
    from amalgam.search.spec import parse_search_spec
    from amalgam.search.trial import Scoring, score_all
    from amalgam.sweep import point_recipe
    from amalgam.zoo import build_zoo, default_zoo_dir

    torch.set_num_threads(1)
    zoo = build_zoo(default_zoo_dir(), profile=args.profile, log=log)
    tasks = sorted(zoo.experts)[: args.experts]
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    limits = {"validation": args.limit, "test": None}
    scoring = Scoring(zoo.tasks_dir, tuple(tasks), limits)

    log(f"grid: task_arithmetic lambda in {SUM_GRID}")
    start = time.perf_counter()
    template = parse_recipe(recipe_data(zoo, tasks, 1.0, 0.3))
    grid = Grid.model_validate({"methods": {"task_arithmetic": {"lambda": list(SUM_GRID)}}})
    points = grid.points()
    scored = score_all([point_recipe(template, p) for p in points], scoring, 2, "ray")
    grid_rows = [
        {
            "lambda": p.params["lambda"],
            "validation": mean(s.scores["validation"]),
            "test": mean(s.scores["test"]),
        }
        for p, s in zip(points, scored, strict=True)
    ]
    grid_seconds = time.perf_counter() - start
    grid_best = max(grid_rows, key=lambda r: r["validation"])

    log("greedy soup over the experts")
    began = time.perf_counter()
    linear = {**recipe_data(zoo, tasks, 1.0, 0.3), "method": "linear", "params": {}}
    candidates = parse_recipe({k: v for k, v in linear.items() if k != "base"})
    soup = run_soup(candidates, limit=args.limit, workers=2, executor="ray", merge=False)
    (soup_scores,) = score_all([soup_recipe(candidates, soup.ingredients)], scoring, 1, "ray")
    soup_row = {
        "ingredients": soup.ingredients,
        "steps": [asdict(step) for step in soup.steps],
        "validation": mean(soup_scores.scores["validation"]),
        "test": mean(soup_scores.scores["test"]),
        "seconds": time.perf_counter() - began,
    }

    recipe_file = WORK / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_data(zoo, tasks, 0.3, 1.0)))
    runs = {}
    for workers in (1, 2):
        spec = parse_search_spec(
            {
                "recipe": str(recipe_file),
                "space": {"weight": {"low": 0.0, "high": 1.0}},
                "objective": {
                    "tasks": dict.fromkeys(tasks, 1.0),
                    "limit": args.limit,
                },
                "generations": args.generations,
                "seed": 0,
                "workers": workers,
                "executor": "ray",
                "state": str(WORK / f"state-{workers}"),
            },
            "benchmark",
        )
        log(f"search: {args.generations} generations on Ray, {workers} worker(s)")
        began = time.perf_counter()
        result = run_search(spec)
        runs[workers] = (result, time.perf_counter() - began)
        log(f"  {result.trials} trials, {runs[workers][1]:.1f} s")
    trials = {w: _trials(WORK / f"state-{w}") for w in runs}
    same = [(t.x, t.scores) for t in trials[1]] == [(t.x, t.scores) for t in trials[2]]
    best = runs[2][0]
    trial_seconds = [t.seconds for t in trials[2]]
    return {
        "zoo": args.profile,
        "tasks": tasks,
        "search_split": f"validation (first {args.limit} records per task)",
        "heldout_split": "test (every record)",
        "budget": {
            "generations": best.generations,
            "trials": best.trials,
            "population": best.trials // best.generations,
            "seconds_1_worker": runs[1][1],
            "seconds_2_workers": runs[2][1],
            "speedup": runs[1][1] / runs[2][1],
            "mean_trial_seconds": sum(trial_seconds) / len(trial_seconds),
            "same_trials_1_vs_2_workers": same,
        },
        "start": {"recipe": "task_arithmetic lambda 0.3", **best.start["objective"]},
        "grid": {"points": grid_rows, "best": grid_best, "seconds": grid_seconds},
        "soup": soup_row,
        "search": {
            "validation": best.best_scores["objective"]["validation"],
            "test": best.best_scores["objective"]["test"],
            "weights": best.best["values"],
            "per_task_test": best.best_scores["scores"]["test"],
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def _trials(state: Path) -> list:
    """The trials in a search's checkpoint (written by this run)."""
    import pickle

    with (state / "state.pkl").open("rb") as fh:
        return pickle.load(fh).trials


def markdown(r: dict[str, Any]) -> str:
    b, g, s = r["budget"], r["grid"], r["search"]
    lines = [
        "# Evolutionary recipe search vs grid sweep",
        "",
        f"Zoo: {r['zoo']}; task arithmetic over {len(r['tasks'])} experts "
        f"({', '.join(r['tasks'])}). Search split: {r['search_split']}; held-out: "
        f"{r['heldout_split']}. Mean accuracy over the tasks. `python benchmarks/search.py"
        + (" --quick`" if r["zoo"] == "tiny" else "`")
        + f" ({r['machine']}).",
        "",
        "| recipe | validation | test (held out) |",
        "|---|---|---|",
        f"| start: task arithmetic, lambda 0.3 (default) | {r['start']['validation']:.4f} | "
        f"{r['start']['test']:.4f} |",
        f"| grid sweep best on validation: lambda {g['best']['lambda']} | "
        f"{g['best']['validation']:.4f} | {g['best']['test']:.4f} |",
        f"| CMA-ES search: one weight per expert | {s['validation']:.4f} | {s['test']:.4f} |",
        f"| greedy soup (uniform average of {', '.join(r['soup']['ingredients'])}) | "
        f"{r['soup']['validation']:.4f} | {r['soup']['test']:.4f} |",
        "",
        f"Search minus grid on the held-out split: {s['test'] - g['best']['test']:+.4f}.",
        "",
        f"Budget: {b['trials']} trials ({b['generations']} generations of {b['population']}), "
        f"{b['mean_trial_seconds']:.2f} s per trial (merge in memory + scoring); grid "
        f"{len(g['points'])} points in {g['seconds']:.1f} s (validation and the whole test "
        "split each).",
        "",
        "| Ray workers | search wall time (s) |",
        "|---|---|",
        f"| 1 | {b['seconds_1_worker']:.1f} |",
        f"| 2 | {b['seconds_2_workers']:.1f} |",
        "",
        f"Speed-up {b['speedup']:.2f}x; the same trials and best with 1 and 2 workers: "
        f"{b['same_trials_1_vs_2_workers']}.",
        "",
        "Grid points (lambda: validation / test): "
        + ", ".join(f"{p['lambda']}: {p['validation']:.4f} / {p['test']:.4f}" for p in g["points"]),
        "",
        "Searched weights: " + ", ".join(f"{k} {v:.3f}" for k, v in s["weights"].items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny zoo, 4 experts")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.profile = "tiny" if args.quick else "full"
    args.experts = 4 if args.quick else 8
    args.generations = 4 if args.quick else 8
    args.limit = 40 if args.quick else 60
    result = run(args)
    args.results.mkdir(parents=True, exist_ok=True)
    name = "search-quick" if args.quick else "search"
    (args.results / f"{name}.json").write_text(json.dumps(result, indent=1))
    (args.results / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
