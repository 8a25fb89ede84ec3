"""The learn pass: find or learn the recipe's merge coefficients (AdaMerging, Concrete)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from amalgam.checkpoint import Checkpoint, open_checkpoint
from amalgam.engine.plan import LearnPass, Plan
from amalgam.errors import StatisticsError
from amalgam.statistics.artifact import StatisticsInfo
from amalgam.statistics.compute import load_model
from amalgam.statistics.data import load_examples
from amalgam.statistics.learning import (
    LEARNED_KEY,
    build_problem,
    cache_uri,
    cached_learned,
    learned_key,
    read_table,
    write_learned,
)


def attach_learned(
    plan: Plan, inputs: dict[str, Checkpoint], pass_: LearnPass, device: str = "auto"
) -> tuple[Plan, dict[str, Any]]:
    """The plan with the learned artifact as its statistics (when it holds masks), and the
    ``ctx.stats`` entries of its table. The artifact is keyed by every input's content hash,
    every model's data hash, the method, its learning settings, the seed and the merged tensor
    names; a finished artifact under the key is reused, never learned again. A merged tensor
    the model does not hold as a parameter (a stored buffer) gets, for each model, the mean of
    the learned coefficients of that model."""
    recipe = plan.recipe
    loaded = []
    for i, m in enumerate(recipe.models):
        if not m.data:
            raise StatisticsError(
                f"models[{i}].data: method '{recipe.method}' learns its coefficients on each "
                f"model's unlabelled data; {m.label} names none (a task folder or jsonl)"
            )
        loaded.append(load_examples(m.data, **recipe.storage_options))
    settings = {**json.loads(pass_.settings), "method": recipe.method, "seed": recipe.seed}
    merged = sorted(j.name for j in plan.jobs if not j.copy)
    names_hash = hashlib.sha256("\0".join(merged).encode()).hexdigest()
    hashes = [inputs[label].content_hash() for label in plan.labels]
    data_hashes = [h for _, h in loaded]
    key = learned_key(hashes, data_hashes, {**settings, "merged": names_hash})
    uri = cache_uri(key)
    info = cached_learned(uri)
    if info is None:
        info = _learn(plan, inputs, pass_, device, loaded, settings, set(merged), uri)
    with open_checkpoint(info.uri) as ckpt:
        table = read_table(info, ckpt)
    missing = [n for n in merged if n not in table]
    if missing:
        k = len(recipe.models)
        mean = tuple(sum(row[j] for row in table.values()) / len(table) for j in range(k))
        table.update((n, mean) for n in missing)
    masked = any(n in info.shapes for n in merged)
    plan = dataclasses.replace(
        plan,
        statistics=(info,) if masked else (),
        metadata={**plan.metadata, "statistics": f"learned={info.content_hash}"},
    )
    return plan, {LEARNED_KEY: table}


def _learn(
    plan: Plan,
    inputs: dict[str, Checkpoint],
    pass_: LearnPass,
    device: str,
    loaded: list,
    settings: dict[str, Any],
    merged: set[str],
    uri: str,
) -> StatisticsInfo:
    """Learn on the base model with the models' task vectors; write the artifact to ``uri``."""
    base = inputs["base"]
    if not base.config:
        raise StatisticsError(
            f"base: {base.uri}: learning runs the merged model: the base must be a local "
            "Hugging Face model folder (config.json, weights and tokenizer)"
        )
    model, tokenizer = load_model(base, device)
    models = [inputs[m.label] for m in plan.recipe.models]
    problem, aliases = build_problem(
        model, tokenizer, base, models, [e for e, _ in loaded], merged, settings["samples"]
    )
    learned = pass_.learn(problem, settings, plan.recipe.seed)
    return write_learned(
        uri,
        learned,
        problem.names,
        aliases,
        model_hash=";".join(c.content_hash() for c in inputs.values()),
        data_hash=";".join(h for _, h in loaded),
        samples=sum(len(t) for t in problem.tasks),
        settings=settings,
    )
