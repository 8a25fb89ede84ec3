"""Quality benchmark: every registered merge method on the zoo, scored per task.

Each method in `amalgam.methods.base.REGISTRY` is run through the engine (`run_merge` with a
`Recipe`) on the zoo's full fine-tunes and on its LoRA experts (merged into full models with
`merge_and_unload`), once with the authors' default hyper-parameters and once with the best
value of its one scalar (lambda / scaling) from a small grid scored on the validation split.
Reported numbers are test-split accuracy from `amalgam.evaluate.quick_evaluate`. Continual
methods absorb the experts one per engine run in three task orders (average accuracy after
the last step and backward transfer). Variant rows (`VARIANTS`) run a method again with one
setting fixed: TSV-M with embeddings and head averaged or with the low-rank SVD, PCB over the
whole model, the empirical Fisher, RegMean with embeddings averaged, OPCM without its
projection (the rescaling alone); they run in --quick too. A reference row scores each expert's
task vector alone at task arithmetic's default lambda, which splits task arithmetic's loss into
scaling and interference. Writes `results/quality.{md,json,png}`; see README.md.

`--adapters` runs the per-tensor methods twice on the LoRA experts instead: after
`merge_and_unload` (as above) and on the adapter folders themselves, which the engine
materialises over the recipe's base; it reports both and how far they differ
(`results/quality-adapters.{md,json,png}`).

    python benchmarks/quality.py            # full zoo, every method (under 30 minutes, 2 cores)
    python benchmarks/quality.py --quick    # tiny zoo, 4 tasks, fewer search points
    python benchmarks/quality.py --adapters # adapters through the engine vs merge_and_unload
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import mean
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "quality"

#: Grids of the searched scalar: task vectors summed (lambda scales a sum of N) or averaged.
SUM_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
MEAN_GRID = (0.5, 0.7, 1.0, 1.3, 1.6, 2.0)
#: Methods whose scalar defaults to 1 over a masked or low-rank sum (TSV-M, Consensus).
WIDE_GRID = (0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.6)
QUICK_POINTS = 3


@dataclass(frozen=True)
class Drive:
    """How the benchmark drives one method: its kind, the authors' defaults (over the
    registry's), the scalar searched on validation and its grid, or why it is skipped; for a
    variant row, the registered method it runs and the recipe's overrides."""

    kind: str  # "per_tensor" | "data" | "continual"
    defaults: dict[str, Any] = field(default_factory=dict)
    scalar: str | None = None
    grid: tuple[float, ...] = ()
    skip: str | None = None
    method: str | None = None
    overrides: tuple[dict[str, Any], ...] = ()


#: The authors' defaults (shared/reference/MERGE_METHODS.md, section 0 and each method's).
DRIVES: dict[str, Drive] = {
    "linear": Drive("per_tensor"),
    "model_stock": Drive("per_tensor"),
    "task_arithmetic": Drive("per_tensor", {"lambda": 0.3}, "lambda", SUM_GRID),
    "ties": Drive("per_tensor", {"density": 0.2, "lambda": 1.0}, "lambda", MEAN_GRID),
    "dare_linear": Drive("per_tensor", {"density": 0.1, "lambda": 0.3}, "lambda", SUM_GRID),
    # DARE then TIES's disjoint mean, as the DARE paper combines them
    "dare_ties": Drive(
        "per_tensor", {"density": 0.1, "lambda": 1.0, "normalize": True}, "lambda", MEAN_GRID
    ),
    "breadcrumbs": Drive(
        "per_tensor", {"density": 0.15, "gamma": 0.006, "lambda": 0.2}, "lambda", SUM_GRID
    ),
    "breadcrumbs_ties": Drive(
        "per_tensor", {"density": 0.15, "gamma": 0.006, "lambda": 1.0}, "lambda", MEAN_GRID
    ),
    "slerp": Drive("per_tensor", skip="interpolates exactly two models"),
    # mergekit 0.1.5's defaults; no scalar to search
    "ram": Drive("per_tensor", {"epsilon": 1e-5}),
    "ramplus_tl": Drive("per_tensor", {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}),
    "nearswap": Drive("per_tensor", skip="moves the base toward exactly one model"),
    "arcee_fusion": Drive("per_tensor", skip="fuses exactly one model into the base"),
    "passthrough": Drive("per_tensor", skip="copies one model (or stacks layers: slices)"),
    "tsv_m": Drive("per_tensor", {"lambda": 1.0}, "lambda", WIDE_GRID),
    # outlier bound, energy share: our reading of the paper (its method section unavailable)
    "r_tsvm": Drive(
        "per_tensor", {"lambda": 1.0, "outlier": 3.0, "energy": 0.9}, "lambda", WIDE_GRID
    ),
    "pcb": Drive(
        "per_tensor", {"density": 0.1, "clamp": 0.0001, "lambda": 1.0}, "lambda", MEAN_GRID
    ),
    "consensus_ta": Drive(
        "per_tensor", {"lambda": 0.3, "mask_lambda": 0.6, "agreement": 2}, "lambda", WIDE_GRID
    ),
    "consensus_ties": Drive(
        "per_tensor",
        {"density": 0.2, "lambda": 1.0, "mask_lambda": 0.6, "agreement": 2},
        "lambda",
        WIDE_GRID,
    ),
    "fisher": Drive("data"),
    # one learning run per lambda would multiply its cost: the default only
    "dam": Drive("data", {"lambda": 0.3}),
    "regmean": Drive("data", {"alpha": 0.9}, "alpha", (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)),
    "adamerging": Drive("data", {"granularity": "layer", "steps": 500}),
    # The papers' 2000 (Concrete TA) and 1000 + 1000 (Concrete AdaMerging) steps take 30-60
    # minutes each on two shared cores: a tenth of the mask steps, fewer coefficient steps.
    "concrete_ta": Drive("data", {"lambda": 0.3, "steps": 200}),
    "concrete_adamerging": Drive("data", {"granularity": "layer", "mask_steps": 100, "steps": 300}),
    "continual_avg": Drive("continual"),
    "continual_ta": Drive("continual", {"lambda": 0.3}),
    "continual_ties": Drive("continual", {"density": 0.2, "lambda": 0.5}),
    "opcm": Drive("continual", {"alpha": 0.5}),
    # DELLA's MagPrune keep probabilities density +/- epsilon, rescaled by 1/p (the paper's)
    "della": Drive(
        "per_tensor", {"density": 0.3, "epsilon": 0.1, "lambda": 1.0}, "lambda", MEAN_GRID
    ),
    "della_linear": Drive(
        "per_tensor", {"density": 0.3, "epsilon": 0.1, "lambda": 0.3}, "lambda", SUM_GRID
    ),
    "sce": Drive("per_tensor", {"select_topk": 0.1}),  # FuseChat's tau = 0.1
    "multislerp": Drive("per_tensor"),  # task vectors over the base, equal weights
    "karcher": Drive("per_tensor"),  # the models themselves (base unused), equal weights
    "nuslerp": Drive("per_tensor", skip="interpolates exactly two models"),
}


def variant(method: str, overrides: tuple[dict[str, Any], ...] = (), **fixed: Any) -> Drive:
    """The method's drive with some parameters fixed or some tensors overridden."""
    drive = DRIVES[method]
    return replace(drive, defaults={**drive.defaults, **fixed}, method=method, overrides=overrides)


#: Rows that run a method again with one setting changed, labelled by it; each follows its
#: method's row and runs whenever the method does.
VARIANTS: dict[str, Drive] = {
    "tsv_m (embeddings averaged)": variant(
        "tsv_m", ({"match": "embed_tokens|lm_head", "params": {"svd": "none"}},)
    ),
    "tsv_m (svd lowrank)": variant("tsv_m", svd="lowrank"),
    "pcb (scope model)": variant("pcb", scope="model"),
    "fisher (empirical)": variant("fisher", fisher="empirical"),
    "fisher (sampled, one draw)": variant("fisher", fisher="sampled"),  # the former default
    "regmean (embeddings averaged)": variant("regmean", embeddings="average"),
    "opcm (no projection)": variant("opcm", projection=False),
    "sce (no selection)": variant("sce", select_topk=1.0),
}


def drive_for(name: str, method: Any) -> Drive:
    """The table's entry, else one inferred from the registry: continual methods as such,
    others per tensor with their registry defaults and `lambda` searched if they have one."""
    if name in DRIVES:
        return DRIVES[name]
    if getattr(method, "continual", False):
        return Drive("continual")
    if method.reads_data:
        return Drive("data")
    if method.max_models is not None and method.max_models < 3:
        return Drive("per_tensor", skip=f"takes at most {method.max_models} models")
    has_lambda = method.param("lambda") is not None
    return Drive(
        "per_tensor", {}, "lambda" if has_lambda else None, MEAN_GRID if has_lambda else ()
    )


# -- scoring -------------------------------------------------------------------------------


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a merged folder's safetensors shards."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


class Scorer:
    """Loads merged folders into one reusable model and scores them with the quick scorer."""

    def __init__(self, base: Path, tasks_dir: Path, tasks: list[str], limit: int | None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(base)
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.tasks_dir, self.tasks, self.limit = tasks_dir, tasks, limit
        self.seconds = 0.0

    def load(self, folder: Path) -> None:
        self.model.load_state_dict(load_state(folder))

    def score(self, folder: Path, split: str, tasks: list[str] | None = None) -> dict[str, float]:
        from amalgam.evaluate.quick import quick_evaluate

        start = time.perf_counter()
        self.load(folder)
        scores = quick_evaluate(
            self.model,
            self.tokenizer,
            self.tasks_dir,
            tasks or self.tasks,
            split=split,
            limit=self.limit,
        )
        self.seconds += time.perf_counter() - start
        return scores


def normalized(scores: dict[str, float], own: dict[str, float]) -> float:
    """Mean over tasks of merged accuracy / the task's expert accuracy on it."""
    return mean(scores[t] / own[t] if own[t] else 0.0 for t in own)


# -- running methods -----------------------------------------------------------------------


@dataclass
class Bench:
    zoo: Any
    tasks: list[str]
    scorer: Scorer
    work: Path
    threads: int
    quick: bool

    def merge(
        self,
        method: str,
        models: dict[str, Path],
        params: dict[str, Any],
        out: Path,
        overrides: tuple[dict[str, Any], ...] = (),
        **opts: Any,
    ) -> float:
        """Run one recipe through the engine; its in-engine seconds. Models of a data-driven
        method name their task folder as `data` (statistics from its validation split)."""
        from amalgam.engine import MergeOptions, run_merge
        from amalgam.methods.base import get_method
        from amalgam.recipe import ModelSpec, Recipe

        data = get_method(method).reads_data
        specs = [
            ModelSpec(uri=str(p), name=t, **({"data": str(self.zoo.tasks_dir / t)} if data else {}))
            for t, p in models.items()
        ]
        recipe = Recipe(
            method=method,
            base=str(self.zoo.base),
            models=specs,
            params=params,
            overrides=list(overrides),
            dtype="float32",
        )
        options = MergeOptions(
            output=str(out), overwrite=True, device="cpu", threads=self.threads, **opts
        )
        return run_merge(recipe, options).seconds

    def grid(self, drive: Drive) -> tuple[float, ...]:
        if not self.quick or len(drive.grid) <= QUICK_POINTS:
            return drive.grid
        step = (len(drive.grid) - 1) / (QUICK_POINTS - 1)
        return tuple(drive.grid[round(i * step)] for i in range(QUICK_POINTS))

    def scaled_alone(self, models: dict[str, Path], scale: float) -> dict[str, float]:
        """Each expert's task vector times `scale`, alone, on its own task: what task
        arithmetic at that lambda would score if the tasks did not interfere at all."""
        out = self.work / "merge"
        scores = {}
        for task, folder in models.items():
            self.merge("task_arithmetic", {task: folder}, {"lambda": scale}, out)
            scores[task] = self.scorer.score(out, "test", [task])[task]
        return scores

    def one_shot(
        self, name: str, drive: Drive, models: dict[str, Path], own: dict[str, float]
    ) -> dict[str, Any]:
        """The default run (test split) and, where a scalar exists, the validation search and
        the test score at its best value."""
        out = self.work / "merge"
        method, overrides = drive.method or name, drive.overrides
        start = time.perf_counter()
        merge_s = self.merge(method, models, drive.defaults, out, overrides)
        default = self.scorer.score(out, "test")
        row: dict[str, Any] = {
            "kind": drive.kind,
            "method": method,
            "overrides": list(overrides),
            "default": {
                "params": drive.defaults,
                "test": default,
                "average": mean(default.values()),
                "normalized": normalized(default, own),
            },
            "merge_seconds": merge_s,
        }
        if drive.scalar:
            curve = {}
            for value in self.grid(drive):
                self.merge(method, models, {**drive.defaults, drive.scalar: value}, out, overrides)
                curve[value] = mean(self.scorer.score(out, "validation").values())
            best = max(
                curve, key=lambda v: (curve[v], -abs(v - drive.defaults.get(drive.scalar, 1)))
            )
            params = {**drive.defaults, drive.scalar: best}
            self.merge(method, models, params, out, overrides)
            tuned = self.scorer.score(out, "test")
            row["tuned"] = {
                "scalar": drive.scalar,
                "params": params,
                "validation_curve": curve,
                "test": tuned,
                "average": mean(tuned.values()),
                "normalized": normalized(tuned, own),
            }
        row["seconds"] = time.perf_counter() - start
        return row

    def continual(
        self, name: str, drive: Drive, models: dict[str, Path], own: dict[str, float]
    ) -> dict[str, Any]:
        """Absorb the experts one engine run at a time in each order; after each step score
        the task just absorbed, after the last every task."""
        start = time.perf_counter()
        method = drive.method or name
        runs = {}
        for label, order in self.orders().items():
            just_absorbed: dict[str, float] = {}
            previous: Path | None = None
            merge_s = 0.0
            for step, task in enumerate(order):
                out = self.work / f"step-{step % 2}"
                opts = {"continue_from": str(previous)} if previous else {}
                merge_s += self.merge(method, {task: models[task]}, drive.defaults, out, **opts)
                just_absorbed[task] = self.scorer.score(out, "test", [task])[task]
                previous = out
            final = self.scorer.score(self.work / f"step-{(len(order) - 1) % 2}", "test")
            bwt = mean(final[t] - just_absorbed[t] for t in order[:-1])
            runs[label] = {
                "order": order,
                "test": final,
                "average": mean(final.values()),
                "normalized": normalized(final, own),
                "just_absorbed": just_absorbed,
                "bwt": bwt,
                "merge_seconds": merge_s,
            }
        return {
            "kind": "continual",
            "method": method,
            "overrides": list(drive.overrides),
            "params": drive.defaults,
            "orders": runs,
            "average": mean(r["average"] for r in runs.values()),
            "bwt": mean(r["bwt"] for r in runs.values()),
            "seconds": time.perf_counter() - start,
        }

    def orders(self) -> dict[str, list[str]]:
        shuffled = list(self.tasks)
        random.Random(0).shuffle(shuffled)
        orders = {"manifest": list(self.tasks), "reversed": self.tasks[::-1], "shuffled": shuffled}
        return dict(list(orders.items())[:1]) if self.quick else orders


def lora_experts(zoo: Any, tasks: list[str], work: Path) -> dict[str, Path]:
    """Each LoRA adapter merged into the base with `merge_and_unload`, saved once per zoo."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = {}
    for task in tasks:
        folder = work / f"lora-{zoo.hash}" / task
        if not (folder / "model.safetensors").is_file():
            base = AutoModelForCausalLM.from_pretrained(zoo.base)
            merged = PeftModel.from_pretrained(base, zoo.loras[task]).merge_and_unload()
            tmp = folder.with_name(f".{task}.tmp")
            merged.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(zoo.base).save_pretrained(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        folders[task] = folder
    return folders


def expert_folders(kind: str, zoo: Any, tasks: list[str], work: Path) -> dict[str, Path]:
    """The experts a section merges: `full` fine-tunes, `lora` adapters after
    merge_and_unload, or the `adapter` folders themselves (over the recipe's base)."""
    if kind == "full":
        folders = zoo.experts
    elif kind == "lora":
        folders = lora_experts(zoo, tasks, work)
    else:
        folders = zoo.loras
    return {t: Path(folders[t]) for t in tasks}


def tensor_gap(a: Path, b: Path) -> float:
    """max |a - b| over every tensor of two merged folders, in float32."""
    left, right = load_state(a), load_state(b)
    if set(left) != set(right):
        raise SystemExit(f"error: {a} and {b} hold different tensors")
    return max((left[k].float() - right[k].float()).abs().max().item() for k in left)


def adapter_equality(bench: Bench, sections: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """How far the adapter rows are from the merge_and_unload rows: per method and run, the
    largest accuracy difference over tasks and whether the tuned scalar agrees; and the max
    tensor difference of one merge (task arithmetic at its default) made both ways."""
    lora, adapter = sections["lora"]["methods"], sections["adapter"]["methods"]
    methods = {}
    for name, row in adapter.items():
        other = lora.get(name, {})
        runs = {}
        for label in ("default", "tuned"):
            if label in row and label in other:
                a, b = row[label], other[label]
                runs[label] = {
                    "max_accuracy_diff": max(abs(a["test"][t] - b["test"][t]) for t in tasks),
                    "same_params": a["params"] == b["params"],
                }
        if runs:
            methods[name] = runs
    params = DRIVES["task_arithmetic"].defaults
    outs = {kind: bench.work / f"equality-{kind}" for kind in ("lora", "adapter")}
    for kind, out in outs.items():
        bench.merge("task_arithmetic", sections[kind]["models"], params, out)
    return {
        "methods": methods,
        "tensor_check": {
            "method": "task_arithmetic",
            "params": params,
            "max_abs_diff": tensor_gap(outs["lora"], outs["adapter"]),
        },
    }


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole benchmark; returns what quality.json holds."""
    from amalgam.methods.base import REGISTRY, get_method
    from amalgam.zoo import build_zoo, default_zoo_dir

    get_method("linear")  # fills the registry
    started = time.perf_counter()
    zoo = build_zoo(default_zoo_dir(), profile=args.profile, log=log)
    tasks = zoo.task_names[: args.tasks] if args.tasks else list(zoo.task_names)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    scorer = Scorer(zoo.base, zoo.tasks_dir, tasks, args.limit)
    bench = Bench(zoo, tasks, scorer, work, args.threads, args.quick)
    names = sorted(REGISTRY) if not args.methods else args.methods.split(",")
    drives: dict[str, Drive] = {}
    for name in names:
        drives[name] = drive_for(name, REGISTRY[name])
        drives.update((label, d) for label, d in VARIANTS.items() if d.method == name)
    if args.adapters:  # data-driven methods refuse adapters; continual ones run on full only
        drives = {n: d for n, d in drives.items() if d.kind == "per_tensor"}
    result: dict[str, Any] = {
        "zoo": zoo.root.name,
        "tasks": tasks,
        "limit": args.limit,
        "quick": args.quick,
        "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {args.threads} merge thread(s)",
        "experts": {},
    }
    kinds = ["lora", "adapter"] if args.adapters else ["full", "lora"]
    if args.skip_lora and not args.adapters:
        kinds.remove("lora")
    for kind in kinds:
        models = expert_folders(kind, zoo, tasks, work)
        if kind == "adapter":  # the same experts as the lora section: their scores hold
            reference = result["experts"]["lora"]["reference"]
        else:
            log(f"[{kind}] scoring base and experts")
            reference = {"base": scorer.score(zoo.base, "test")}
            for task in tasks:
                reference[f"expert:{task}"] = scorer.score(models[task], "test")
        own = {t: reference[f"expert:{t}"][t] for t in tasks}
        scale = DRIVES["task_arithmetic"].defaults["lambda"]
        section: dict[str, Any] = {
            "models": models,
            "reference": reference,
            "own": own,
            "scaled_alone": {"lambda": scale, "test": bench.scaled_alone(models, scale)},
            "methods": {},
        }
        for name, drive in drives.items():
            if drive.skip:
                section["methods"][name] = {"kind": drive.kind, "skipped": drive.skip}
                continue
            if kind != "full" and drive.kind == "continual":
                continue
            log(f"[{kind}] {name}")
            try:
                runner = bench.continual if drive.kind == "continual" else bench.one_shot
                section["methods"][name] = runner(name, drive, models, own)
            except Exception as exc:  # a method that fails here is reported, not fatal
                section["methods"][name] = {"kind": drive.kind, "failed": f"{exc}"[:300]}
                log(f"  failed: {exc}")
        result["experts"][kind] = section
    if args.adapters:
        log("[adapter] against merge_and_unload")
        result["adapter_equality"] = adapter_equality(bench, result["experts"], tasks)
    result["scoring_seconds"] = scorer.seconds
    result["seconds"] = time.perf_counter() - started
    return result


# -- report --------------------------------------------------------------------------------


def short(task: str) -> str:
    return task.removeprefix("zoo_")


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def setting(params: dict[str, Any], overrides: Sequence[dict[str, Any]] = ()) -> str:
    """Shared parameters, then each override as `match: parameters`."""
    pairs = [", ".join(f"{k} {v}" for k, v in params.items())]
    pairs += [f"`{o['match']}`: {setting(o['params'])}" for o in overrides]
    return "; ".join(p for p in pairs if p) or "-"


def one_shot_rows(section: dict[str, Any], tasks: list[str]) -> list[list[str]]:
    own, base = section["own"], section["reference"]["base"]
    rows = [
        ["base", "", *map(pct, (*(base[t] for t in tasks), mean(base.values()))), "", ""],
        ["experts (each on its own task)", "", *map(pct, (*own.values(), mean(own.values())))],
    ]
    rows[0][-2] = pct(normalized(base, own))
    rows[1] += ["100.0", ""]
    alone = section["scaled_alone"]["test"]
    rows.append(
        [
            f"each expert alone, task vector x {section['scaled_alone']['lambda']}",
            "no interference",
            *map(pct, (*(alone[t] for t in tasks), mean(alone.values()), normalized(alone, own))),
            "",
        ]
    )
    for name, row in section["methods"].items():
        if row.get("kind") == "continual":
            continue
        if "skipped" in row or "failed" in row:
            note = row.get("skipped") or f"failed: {row['failed']}"
            rows.append([name, f"not run: {note}", *([""] * len(tasks)), "", "", ""])
            continue
        for label in ("default", "tuned"):
            if label not in row:
                continue
            r = row[label]
            seconds = (
                f"{row['merge_seconds']:.1f} / {row['seconds']:.0f}" if label == "default" else ""
            )
            rows.append(
                [
                    name if label == "default" else f"{name} (val-tuned)",
                    setting(r["params"], row["overrides"]),
                    *(pct(r["test"][t]) for t in tasks),
                    pct(r["average"]),
                    pct(r["normalized"]),
                    seconds,
                ]
            )
    return rows


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|---|---" + "|---:" * (len(head) - 2) + "|"]
    cells = ("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)
    return "\n".join([*lines, *cells]) + "\n"


SECTION_TITLES = {
    "full": "Full fine-tunes",
    "lora": "LoRA experts (merge_and_unload)",
    "adapter": "LoRA adapters through the engine (base = zoo base, models = adapter folders)",
}


def equality_text(equality: dict[str, Any]) -> str:
    """The adapter rows against the merge_and_unload rows, as a section."""
    check = equality["tensor_check"]
    rows = []
    for name, runs in equality["methods"].items():
        for label, r in runs.items():
            rows.append(
                [
                    name if label == "default" else f"{name} (val-tuned)",
                    pct(r["max_accuracy_diff"]),
                    "yes" if r["same_params"] else "no",
                ]
            )
    head = ["method", "max accuracy difference over tasks (points)", "same setting"]
    return "\n".join(
        [
            "## Adapters through the engine against merge_and_unload\n",
            "Each method's rows above, adapters against the same adapters after "
            "`merge_and_unload`. One merge made both ways "
            f"({check['method']}, {setting(check['params'])}): max |difference| over every "
            f"tensor {check['max_abs_diff']:.3g} (float32).\n",
            markdown_table(head, rows),
        ]
    )


def render(result: dict[str, Any]) -> str:
    tasks = result["tasks"]
    head = ["method", "setting", *map(short, tasks), "avg", "norm.", "merge s / total s"]
    text = [
        "# Merge quality on the zoo\n",
        f"Zoo `{result['zoo']}`, {len(tasks)} tasks, test split"
        + (f" (first {result['limit']} examples per task)" if result["limit"] else "")
        + f"; {result['machine']}. Whole run {result['seconds'] / 60:.1f} min.\n",
        "Accuracy in %. *norm.*: mean over tasks of merged accuracy / the task's expert "
        "accuracy. *val-tuned*: the method's scalar chosen on the validation split from a "
        "small grid (see `validation_curve` in quality.json). *merge s*: the default run "
        "in the engine; *total s*: default run, search and scoring. *each expert alone*: "
        "base + lambda x one task vector on its own task, with task arithmetic's default "
        "lambda; the gap between it and task arithmetic is what interference between tasks "
        "costs, the gap between it and the experts what the scaling costs.\n",
    ]
    for kind, title in SECTION_TITLES.items():
        if kind not in result["experts"]:
            continue
        section = result["experts"][kind]
        text += [f"## {title}\n", markdown_table(head, one_shot_rows(section, tasks))]
    if "adapter_equality" in result:
        text.append(equality_text(result["adapter_equality"]))
    continual = {
        n: r
        for n, r in result["experts"].get("full", {}).get("methods", {}).items()
        if r.get("kind") == "continual"
    }
    if continual:
        orders = next(iter(r["orders"] for r in continual.values() if "orders" in r), {})
        text.append("## Continual merging (full fine-tunes, one engine run per absorbed model)\n")
        text.append(
            "Average accuracy (%) after the last step and backward transfer (BWT, points: mean "
            "over all but the last task of its accuracy at the end minus right after it was "
            "absorbed), per task order: "
            + "; ".join(f"{k}: {' > '.join(map(short, v['order']))}" for k, v in orders.items())
            + ".\n"
        )
        head_c = (
            ["method", "setting"]
            + [f"{o} {m}" for o in orders for m in ("avg", "BWT")]
            + ["mean avg", "mean BWT", "total s"]
        )
        rows = []
        for name, r in continual.items():
            if "orders" not in r:
                rows.append([name, f"not run: {r.get('failed', r.get('skipped'))}"])
                continue
            cells = [name, setting(r["params"])]
            for o in orders:
                cells += [pct(r["orders"][o]["average"]), f"{100 * r['orders'][o]['bwt']:+.1f}"]
            cells += [pct(r["average"]), f"{100 * r['bwt']:+.1f}", f"{r['seconds']:.0f}"]
            rows.append(cells)
        text.append(markdown_table(head_c, rows))
    return "\n".join(text)


def plot(result: dict[str, Any], path: Path) -> None:
    """Per-task test accuracy by method (the first section's experts; tuned where searched) as
    a heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    kind = next(iter(result["experts"]))
    section = result["experts"][kind]
    rows = {"base": section["reference"]["base"], "experts (own)": section["own"]}
    for name, row in section["methods"].items():
        if "tuned" in row:
            rows[f"{name} (tuned)"] = row["tuned"]["test"]
        elif "default" in row:
            rows[name] = row["default"]["test"]
        elif "orders" in row:
            rows[f"{name} (manifest order)"] = next(iter(row["orders"].values()))["test"]
    data = [[100 * scores[t] for t in tasks] for scores in rows.values()]
    fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 4, 0.38 * len(rows) + 1.5))
    image = ax.imshow(data, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks)), [short(t) for t in tasks], rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), list(rows))
    for i, line in enumerate(data):
        for j, value in enumerate(line):
            ax.text(
                j,
                i,
                f"{value:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value < 60 else "black",
            )
    fig.colorbar(image, ax=ax, label="test accuracy (%)")
    ax.set_title(f"Per-task accuracy by method ({kind} experts), zoo {result['zoo']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny zoo, 4 tasks, 3 grid points")
    parser.add_argument("--profile", default=None, help="zoo profile (default full; tiny if quick)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the registry")
    parser.add_argument("--tasks", type=int, default=None, help="use the first N zoo tasks")
    parser.add_argument("--limit", type=int, default=None, help="examples per task and split")
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument(
        "--adapters",
        action="store_true",
        help="per-tensor methods on the LoRA adapters, through the engine and after "
        "merge_and_unload (results/quality-adapters.*)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (merge and scoring)")
    parser.add_argument("--results", default=str(RESULTS), help="folder for quality.{md,json,png}")
    parser.add_argument("--work", default=str(WORK), help="scratch folder for merged models")
    args = parser.parse_args(argv)
    if args.quick:
        args.profile = args.profile or "tiny"
        args.tasks = args.tasks or 4
        args.limit = args.limit or 32
    args.profile = args.profile or "full"
    torch.set_num_threads(args.threads)
    result = run(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = "quality-adapters" if args.adapters else "quality"
    stem += "-quick" if args.quick else ""
    (results / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result, results / f"{stem}.png")
    (results / f"{stem}.md").write_text(render(result) + f"\n![per-task accuracy]({stem}.png)\n")
    print(results / f"{stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
