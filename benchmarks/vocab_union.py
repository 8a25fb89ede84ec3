"""Vocabulary union on the zoo's token experts: does a union merge keep each expert's
new-token task working?

The zoo variants (`amalgam.zoo.variants.build_variants`) hold two experts fine-tuned from the
zoo base with different added tokens (`token_experts`: each learns a task written in a script
the base tokenizer lacks), and the same two experts trained from a base that had both token
sets from the start (`token_reference`). Both pairs are merged by the same recipe with
`align: {method: vocab}` (union): for the token experts the union adds each one's tokens and
the merge copies rows only one expert owns; the reference experts share every token, so
their new-token rows are merged like any other. Each merge is scored on the new-token tasks
(quick scorer, test split), and the union merge's tokenizer is checked to encode every token
of every input tokenizer to the same string. Target: union within 5 points of the reference.

    python benchmarks/vocab_union.py --profile tiny     # tiny zoo (tests)
    python benchmarks/vocab_union.py                    # full zoo -> results/vocab_union.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amalgam.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "vocab_union"
RESULTS = ROOT / "benchmarks" / "results"
TARGET_POINTS = 5.0
INITS = ("auto", "mean")


def union_recipe(base: Path, experts: dict[str, Path], method: str, init: str = "auto") -> Recipe:
    """The experts merged over ``base`` by ``method`` with the vocabulary union (``init``: the
    fill of the rows a model lacks)."""
    from amalgam.recipe import Recipe

    params = {"lambda": 1.0} if method == "task_arithmetic" else {}
    return Recipe.model_validate(
        {
            "method": method,
            "base": str(base),
            "models": [{"uri": str(p), "name": k} for k, p in sorted(experts.items())],
            "params": params,
            "align": {"method": "vocab", "tokenizer": {"source": "union", "init": init}},
        }
    )


def merge(recipe: Recipe, out: Path) -> Path:
    """``recipe`` run by the pipeline (align, then merge) into ``out``."""
    from amalgam.engine.options import MergeOptions
    from amalgam.pipeline import run_pipeline

    shutil.rmtree(out, ignore_errors=True)
    run_pipeline(recipe, MergeOptions(output=str(out)))
    return out


def merge_diluted(recipe: Recipe, work: Path, out: Path) -> Path:
    """``recipe`` merged from its aligned copies without their ownership sidecars: every row
    merged over every model, fill included (what the row ownership avoids)."""
    from amalgam.align import run_align
    from amalgam.align.vocab.ownership import ROWS_FILE
    from amalgam.engine.options import MergeOptions
    from amalgam.engine.run import run_merge

    inputs = {"base": recipe.base, **{m.label: m.uri for m in recipe.models}}
    aligned = run_align(recipe.align, inputs, workdir=str(work / "aligned"))
    read_from = {}
    for label, uri in aligned.items():
        copy = work / "without-ownership" / label
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(uri, copy)
        (copy / ROWS_FILE).unlink(missing_ok=True)
        read_from[label] = str(copy)
    shutil.rmtree(out, ignore_errors=True)
    run_merge(recipe, MergeOptions(read_from=read_from, aligned=True, output=str(out)))
    return out


def score(model_dir: Path, tasks_dir: Path, tasks: list[str], limit: int | None) -> dict:
    """Task -> accuracy (percent) of the model in ``model_dir``."""
    from amalgam.device import load_causal_lm
    from amalgam.evaluate.quick import quick_evaluate

    model, tokenizer = load_causal_lm(model_dir, "cpu")
    acc = quick_evaluate(model, tokenizer, tasks_dir, tasks, limit=limit)
    return {task: 100.0 * value for task, value in acc.items()}


def round_trip_failures(merged: Path, inputs: list[Path]) -> tuple[int, int]:
    """(tokens checked, tokens the merged tokenizer does not give back as the same string)."""
    from transformers import AutoTokenizer

    out = AutoTokenizer.from_pretrained(merged)
    checked = failed = 0
    for folder in inputs:
        tok = AutoTokenizer.from_pretrained(folder)
        for token, i in tok.get_vocab().items():
            j = out.convert_tokens_to_ids(token)
            checked += 1
            failed += out.convert_ids_to_tokens(j) != token or out.decode([j]) != tok.decode([i])
    return checked, failed


def new_row_error(merged: Path, base: Path, experts: dict[str, Path]) -> float:
    """Mean relative L2 distance, over the embedding and LM-head rows of every token an expert
    added (none of the others has it), between the merged row and the expert's own row."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out_ids = AutoTokenizer.from_pretrained(merged).get_vocab()
    out = load_file(merged / "model.safetensors")
    known = set(AutoTokenizer.from_pretrained(base).get_vocab())
    errors = []
    for path in experts.values():
        own = load_file(path / "model.safetensors")
        for token, i in AutoTokenizer.from_pretrained(path).get_vocab().items():
            if token in known:
                continue
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                row = own[name][i]
                errors.append(
                    float(
                        torch.linalg.norm(out[name][out_ids[token]] - row) / torch.linalg.norm(row)
                    )
                )
    return sum(errors) / len(errors)


def run(profile: str, methods: list[str], limit: int | None) -> dict:
    import torch

    from amalgam.zoo import build_zoo
    from amalgam.zoo.variants import build_variants

    torch.set_num_threads(1)
    home = Path(os.environ.get("AMALGAM_HOME", ROOT / ".amalgam"))
    zoo = build_zoo(home / "zoo", profile=profile, log=lambda _: None)
    variants = build_variants(zoo, log=lambda _: None)
    tasks = sorted(set(variants.token_tasks.values()))
    result: dict = {"profile": profile, "tasks": tasks, "experts": {}, "merges": {}}
    for kind, experts in (("", variants.token_experts), ("reference ", variants.token_reference)):
        for key, path in sorted(experts.items()):
            result["experts"][f"{kind}expert {key}"] = score(path, variants.tasks_dir, tasks, limit)
    for method in methods:
        union = union_recipe(zoo.base, variants.token_experts, method)
        out = merge(union, WORK / f"{method}-union")
        checked, failed = round_trip_failures(out, [zoo.base, *variants.token_experts.values()])
        row = {
            "union": score(out, variants.tasks_dir, tasks, limit),
            "round_trip": {"tokens": checked, "failed": failed},
            "row_error": {"union": new_row_error(out, zoo.base, variants.token_experts)},
        }
        for init in INITS:
            union = union_recipe(zoo.base, variants.token_experts, method, init)
            if init != "auto":
                out = merge(union, WORK / f"{method}-union-{init}")
                row[f"union, init {init}"] = score(out, variants.tasks_dir, tasks, limit)
            out = merge_diluted(union, WORK / method / init, WORK / f"{method}-diluted-{init}")
            kind = f"without ownership, init {init}"
            row[kind] = score(out, variants.tasks_dir, tasks, limit)
            row["row_error"][kind] = new_row_error(out, zoo.base, variants.token_experts)
        reference = union_recipe(zoo.base, variants.token_reference, method)
        out = merge(reference, WORK / f"{method}-reference")
        row["reference"] = score(out, variants.tasks_dir, tasks, limit)
        row["gap"] = {t: row["union"][t] - row["reference"][t] for t in tasks}
        result["merges"][method] = row
    return result


def markdown(result: dict) -> str:
    tasks = result["tasks"]
    lines = [
        f"# Vocabulary union vs shared-vocabulary reference ({result['profile']} zoo)",
        "",
        "Accuracy (%) on the new-token tasks, quick scorer, test split. `union`: the token",
        "experts (different added tokens) merged with `align: {method: vocab}`; `reference`:",
        "the same experts trained from a base that had both token sets, merged by the same",
        "recipe; `without ownership`: the union's aligned copies merged without their row",
        "ownership (every row over every model, fill included); `init`: the fill of a row a",
        "model lacks (auto: the base's row, else the mean of the models that have the token;",
        "mean: the model's own mean row); `gap`: union - reference.",
        f"Target: union within {TARGET_POINTS:.0f} points of the reference.",
        "",
        "| model | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for key, acc in result["experts"].items():
        lines.append(f"| {key} | " + " | ".join(f"{acc[t]:.1f}" for t in tasks) + " |")
    for method, row in result["merges"].items():
        kinds = ["union", *(k for k in row if k.startswith(("union,", "without"))), "reference"]
        for kind in [*kinds, "gap"]:
            cells = " | ".join(
                f"{row[kind][t]:+.1f}" if kind == "gap" else f"{row[kind][t]:.1f}" for t in tasks
            )
            lines.append(f"| {method} {kind} | {cells} |")
    lines += [
        "",
        "Rows of the added tokens (each owned by one expert): mean relative L2 distance of the",
        "merged embedding and LM-head row from the owning expert's row. With `init: auto` the",
        "fill of a token only one expert has is that expert's row, so those rows come out exact",
        "even without ownership; the ownership keeps them exact whatever the fill.",
        "",
        "| merge | distance |",
        "|---|---|",
    ]
    for method, row in result["merges"].items():
        for kind, error in row["row_error"].items():
            lines.append(f"| {method} {kind} | {error:.4f} |")
    lines.append("")
    for method, row in result["merges"].items():
        rt = row["round_trip"]
        within = all(abs(g) <= TARGET_POINTS or g > 0 for g in row["gap"].values())
        lines.append(
            f"- {method}: round trip {rt['tokens'] - rt['failed']}/{rt['tokens']} input tokens "
            f"encode to the same string; target {'met' if within else 'missed'}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="full", choices=["tiny", "full"])
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "linear"])
    parser.add_argument("--limit", type=int, default=None, help="records per task")
    args = parser.parse_args()
    result = run(args.profile, args.methods, args.limit)
    text = markdown(result)
    print(text)
    if args.profile == "full":
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "vocab_union.md").write_text(text)
        (RESULTS / "vocab_union.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
