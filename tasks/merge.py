"""The merge task: run the engine, or skip when the output already holds this exact merge."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from amalgam.checkpoint import open_checkpoint
from amalgam.engine import MergeOptions, output_of, run_merge
from amalgam.errors import CheckpointError, OutputError
from amalgam.fetch import FetchedModel
from amalgam.recipe import Recipe
from tasks.retry import RETRIES


@dataclass(frozen=True)
class Merged:
    """A finished merge: where, its content hash, and whether this run computed it."""

    output: str
    content_hash: str
    skipped: bool
    seconds: float = 0.0


def provenance_matches(
    output: str, recipe: Recipe, inputs: list[FetchedModel], continue_from: str | None = None
) -> bool:
    """True when ``output`` is a finished model written from this recipe and these exact
    inputs: by the recipe hash and parent content hashes in its safetensors metadata, or for a
    continual merge by its state (method, parameters, base and absorbed models' hashes)."""
    if recipe.method_spec.continual:
        return _continual_matches(output, recipe, inputs, continue_from)
    try:
        with open_checkpoint(output, **recipe.storage_options) as ckpt:
            metas = list(ckpt.metadata.values())
    except CheckpointError:
        return False
    if not metas:
        return False
    parents = set(metas[0].get("parents", "").split(";"))
    return metas[0].get("recipe_hash") == recipe.hash() and all(
        f"{m.label}={m.content_hash}" in parents for m in inputs
    )


def _continual_matches(
    output: str, recipe: Recipe, inputs: list[FetchedModel], continue_from: str | None
) -> bool:
    from amalgam.engine.continual import read_state, shared_params

    so = recipe.storage_options
    try:
        state = read_state(output, **so)
        before = read_state(continue_from, **so).models if continue_from else []
    except CheckpointError:
        return False
    hashes = {m.label: m.content_hash for m in inputs}
    expected = [m.content_hash for m in before] + [hashes[m.label] for m in recipe.models]
    return (
        state.method == recipe.method
        and state.params == shared_params(recipe.params, recipe.method_spec)
        and state.base.content_hash == hashes.get("base")
        and [m.content_hash for m in state.models] == expected
    )


def content_hash(output: str, storage_options: dict) -> str:
    with open_checkpoint(output, **storage_options) as ckpt:
        return ckpt.content_hash()


@task(name="merge", cache_policy=NO_CACHE, **RETRIES)
def merge(recipe: Recipe, options: MergeOptions, inputs: list[FetchedModel]) -> Merged:
    """Merge with the chosen executor (local threads or Ray), unless already done."""
    return merge_or_skip(recipe, options, inputs)


def merge_or_skip(recipe: Recipe, options: MergeOptions, inputs: list[FetchedModel]) -> Merged:
    """Run the engine. The cache key is the content: when the output already holds a merge of
    this recipe over inputs with these content hashes, nothing is recomputed."""
    logger = get_run_logger()
    output = output_of(recipe, options)
    if provenance_matches(output, recipe, inputs, options.continue_from):
        logger.info("%s already holds this merge (same recipe and input hashes): skipped", output)
        return Merged(output, content_hash(output, recipe.storage_options), skipped=True)
    try:
        result = run_merge(recipe, options)
    except OutputError:
        if not provenance_matches(output, recipe, inputs, options.continue_from):
            raise
        logger.info("%s was written meanwhile by a concurrent run: skipped", output)
        return Merged(output, content_hash(output, recipe.storage_options), skipped=True)
    logger.info(
        "merged %d inputs with %s into %s in %.1f s (%.2f GB/s)",
        len(result.plan.labels),
        recipe.method,
        result.output,
        result.seconds,
        result.gb_per_s,
    )
    return Merged(
        result.output, content_hash(result.output, recipe.storage_options), False, result.seconds
    )
