"""Embedding benchmark: the MiniLM zoo's base, its two fine-tunes and their TA, TIES and TSV-M
merges (``amalgam.zoo.minilm.recipes``, through the engine), each scored by the embedding
scorer on both tasks' test splits (sentiment: nearest-centroid accuracy; roles: nDCG@10, with
recall@1 and recall@10 beside it). Writes ``results/embedding.{md,json}``.

    python benchmarks/embedding.py     # about 20 s with the zoo cached (about 70 s more without)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from amalgam.engine import MergeOptions, run_merge
from amalgam.evaluate.embedding import Encoder, retrieval_figures, score_task
from amalgam.evaluate.embedding_tasks import FIELDS, read_records
from amalgam.recipe import parse_recipe
from amalgam.zoo.build import default_zoo_dir
from amalgam.zoo.minilm import build_embedding_zoo
from amalgam.zoo.minilm.build import TASKS
from amalgam.zoo.minilm.recipes import MERGES, merge_recipe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "embedding"


def figures(folder: Path, tasks_dir: Path) -> dict[str, float]:
    encoder = Encoder(folder, "cpu", 64)
    out = {t: score_task(encoder, tasks_dir, t, "test", None).accuracy for t in TASKS}
    queries = read_records(tasks_dir, "roles", "test", FIELDS["retrieval"])
    recall = retrieval_figures(encoder, tasks_dir, "roles", queries, 10, [1, 10], "roles")
    return out | {f"roles {k}": v for k, v in recall.items() if k.startswith("recall")}


def main() -> None:
    started = time.perf_counter()
    zoo = build_embedding_zoo(default_zoo_dir())
    models = {"base": zoo.base, **{f"expert {t}": p for t, p in zoo.experts.items()}}
    for method in MERGES:
        recipe = parse_recipe(merge_recipe(zoo, method, WORK / method))
        run_merge(recipe, MergeOptions(device="cpu", overwrite=True))
        models[method] = WORK / method
    rows = {name: figures(folder, zoo.tasks_dir) for name, folder in models.items()}
    expert = {t: rows[f"expert {t}"][t] for t in TASKS}
    for row in rows.values():
        row["mean normalized"] = sum(row[t] / expert[t] for t in TASKS) / len(TASKS)
    columns = ["sentiment", "roles", "roles recall@1", "roles recall@10", "mean normalized"]
    lines = [
        "| model | sentiment acc | roles nDCG@10 | roles recall@1 | roles recall@10 "
        "| mean normalized |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |"
            for name, row in rows.items()
        ),
    ]
    seconds = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "embedding.md").write_text("\n".join(lines) + f"\n\n{seconds} s\n")
    (RESULTS / "embedding.json").write_text(
        json.dumps({"rows": rows, "params": MERGES, "seconds": seconds}, indent=2) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
