"""One candidate of a search or a soup: its recipe merged into a scratch store (in memory when
the model fits, else a scratch folder), loaded and scored by the quick scorer; nothing of it
is kept but the scores."""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from amalgam.checkpoint import open_checkpoint
from amalgam.device import compute_threads
from amalgam.errors import MergeError
from amalgam.recipe import Recipe

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Scoring:
    """What a candidate is scored on: task folder, tasks, and per split the records per task
    (None: all); ``scratch``: "memory" or a folder for candidates too large for memory."""

    tasks_dir: Path
    tasks: tuple[str, ...]
    splits: dict[str, int | None]
    scratch: str = "memory"


@dataclass(frozen=True)
class TrialScores:
    """Accuracy per split and task, the seconds it took and where it ran."""

    scores: dict[str, dict[str, float]]
    seconds: float
    host: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


def weighted(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The weighted mean of task accuracies."""
    return sum(scores[t] * w for t, w in weights.items()) / sum(weights.values())


def score_candidate(recipe: Recipe, scoring: Scoring) -> TrialScores:
    """Merge ``recipe`` into scratch, score it on every split, remove the scratch copy."""
    # lazy: the engine, transformers and the scorer load torch
    from amalgam.engine import MergeOptions, run_merge

    start = time.perf_counter()
    name = uuid.uuid4().hex
    if scoring.scratch == "memory":
        uri = f"memory://amalgam-search/{name}"
    else:
        uri = str(Path(scoring.scratch) / name)
    with compute_threads(1):
        try:
            run_merge(recipe.model_copy(update={"output": uri}), MergeOptions(threads=1))
            scores = _score_output(uri, recipe, scoring)
        finally:
            _remove(uri)
    return TrialScores(scores, time.perf_counter() - start)


def _score_output(uri: str, recipe: Recipe, scoring: Scoring) -> dict[str, dict[str, float]]:
    # lazy: transformers takes seconds to import
    from transformers import AutoTokenizer

    from amalgam.evaluate.quick import quick_evaluate

    model = load_model(uri)
    tokenizer = AutoTokenizer.from_pretrained(recipe.base or recipe.models[0].uri)
    return {
        split: quick_evaluate(
            model, tokenizer, scoring.tasks_dir, scoring.tasks, split=split, limit=limit
        )
        for split, limit in scoring.splits.items()
    }


def load_model(uri: str) -> torch.nn.Module:
    """The causal LM stored at ``uri`` (any store), built from its config.json."""
    # lazy: transformers takes seconds to import
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = open_checkpoint(uri)
    try:
        config = dict(ckpt.config or {})
        if "model_type" not in config:
            raise MergeError(f"{uri}: the merged model has no config.json with a model_type")
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(config.pop("model_type"), **config)
        )
        state = {n: ckpt.tensor(n) for n in ckpt.names()}
    finally:
        ckpt.close()
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise MergeError(
            f"{uri}: tensors do not fit the model (missing {result.missing_keys}, unexpected "
            f"{result.unexpected_keys})"
        )
    return model.eval()


def _remove(uri: str) -> None:
    if uri.startswith("memory://"):
        # lazy: fsspec is only needed to free the in-memory store
        import fsspec

        fs = fsspec.filesystem("memory")
        path = uri.removeprefix("memory://")
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        shutil.rmtree(uri, ignore_errors=True)


def score_all(
    recipes: Sequence[Recipe], scoring: Scoring, workers: int, executor: str
) -> list[TrialScores]:
    """Every recipe scored, at most ``workers`` at a time: Ray tasks (``executor="ray"``,
    one CPU each) or one after another in this process (``"local"``); results in order."""
    if executor == "local":
        return [score_candidate(r, scoring) for r in recipes]
    # lazy: Ray takes seconds to import
    import ray

    from amalgam.engine.ray_executor import ensure_ray
    from amalgam.storage import amalgam_home

    ensure_ray(amalgam_home())
    remote = ray.remote(num_cpus=1, max_retries=1)(score_candidate)
    pending: dict[ray.ObjectRef, int] = {}
    results: list[TrialScores | None] = [None] * len(recipes)
    queue = list(enumerate(recipes))
    while queue or pending:
        while queue and len(pending) < workers:
            i, recipe = queue.pop(0)
            pending[remote.remote(recipe, scoring)] = i
        [done], _ = ray.wait(list(pending), num_returns=1)
        results[pending.pop(done)] = ray.get(done)
    return [r for r in results if r is not None]
