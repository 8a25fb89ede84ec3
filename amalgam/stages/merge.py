"""The merge stage: run the engine, or skip when the output already holds this exact merge."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from amalgam import storage
from amalgam.adapters.adapter_output import merge_recipe
from amalgam.checkpoint import open_checkpoint
from amalgam.engine import MergeOptions, output_of
from amalgam.engine.continual import read_state, shared_params
from amalgam.errors import CheckpointError, OutputError
from amalgam.fetch import FetchedModel
from amalgam.recipe import Recipe
from amalgam.stages.base import Stage, content_key
from amalgam.writer import intact, remove_leftovers

log = logging.getLogger(__name__)

#: Recipe fields that do not change a merge's bytes (later stages' sections, where it goes).
NOT_MERGE = {"output", "storage_options", "executor", "compress", "evaluate", "register", "base"}


@dataclass(frozen=True)
class Merged:
    """A finished merge: where, its content hash, whether this run computed it, and when it
    did, its time and the input bytes it read."""

    output: str
    content_hash: str
    skipped: bool
    seconds: float = 0.0
    bytes_read: int = 0


@dataclass(frozen=True)
class MergeInput:
    recipe: Recipe
    options: MergeOptions
    inputs: list[FetchedModel]

    @property
    def output(self) -> str:
        return output_of(self.recipe, self.options)


def content_hash(uri: str, storage_options: dict[str, Any]) -> str:
    with open_checkpoint(uri, **storage_options) as ckpt:
        return ckpt.content_hash()


def merge_section(recipe: Recipe) -> dict[str, Any]:
    """The recipe as the merge sees it: method, parameters, overrides, dtype, seed and each
    model's label and parameters; no URI (the inputs' content hashes stand for them)."""
    body = recipe.model_dump(mode="json", exclude=NOT_MERGE | {"models"}, exclude_none=True)
    body["models"] = [
        {"label": m.label, **m.model_dump(mode="json", exclude={"uri", "name"}, exclude_none=True)}
        for m in recipe.models
    ]
    return body


def provenance_matches(
    output: str, recipe: Recipe, inputs: list[FetchedModel], continue_from: str | None = None
) -> bool:
    """True when ``output`` is a finished model written from this recipe and these exact
    inputs: by the recipe hash and parent content hashes in its safetensors metadata, or for a
    continual merge by its state (method, parameters, base and absorbed models' hashes)."""
    if recipe.method_spec.continual:
        return continual_matches(output, recipe, inputs, continue_from)
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


def continual_matches(
    output: str, recipe: Recipe, inputs: list[FetchedModel], continue_from: str | None
) -> bool:
    """``output``'s continual state is ``continue_from``'s with these inputs absorbed, by the
    same method, parameters and base."""
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


class MergeStage(Stage[MergeInput, Merged]):
    """Merge with the chosen executor (local threads or Ray), unless the output already holds
    a merge of this recipe over inputs with these content hashes."""

    name = "merge"

    def key(self, inp: MergeInput) -> str:
        so = inp.recipe.storage_options
        start = inp.options.continue_from
        body = {
            "recipe": merge_section(inp.recipe),
            "inputs": {m.label: m.content_hash for m in inp.inputs},
            "continue_from": content_hash(start, so) if start else None,
        }
        return content_key(self.name, body)

    def done(self, inp: MergeInput) -> Merged | None:
        """The output, when its provenance names this recipe and these inputs and its files
        are the ones its commit recorded (a changed or half-copied output is merged again)."""
        if not self._provenance(inp) or not self._intact(inp):
            return None
        return Merged(inp.output, content_hash(inp.output, inp.recipe.storage_options), True)

    def _provenance(self, inp: MergeInput) -> bool:
        return provenance_matches(inp.output, inp.recipe, inp.inputs, inp.options.continue_from)

    def _intact(self, inp: MergeInput) -> bool:
        fs, path = storage.resolve(inp.output, **inp.recipe.storage_options)
        remove_leftovers(fs, path)  # a killed run's staging, also when this run skips
        return intact(fs, path)

    def skip_reason(self, inp: MergeInput, out: Merged) -> str:
        return f"{out.output} already holds this merge (same recipe and input hashes)"

    def run(self, inp: MergeInput) -> Merged:
        recipe, options = inp.recipe, inp.options
        if self._provenance(inp):  # done() found it changed since its commit
            log.warning(
                "%s holds this merge but its files differ from its commit record (changed, "
                "or written before records): merging again",
                inp.output,
            )
            options = options.model_copy(update={"overwrite": True})
        try:
            result = merge_recipe(recipe, options)
        except OutputError:
            found = self.done(inp)
            if found is None:
                raise
            log.info("%s was written meanwhile by a concurrent run: skipped", inp.output)
            return found
        log.info(
            "merged %d inputs with %s into %s in %.1f s (%.2f GB/s)",
            len(result.plan.labels),
            recipe.method,
            result.output,
            result.seconds,
            result.gb_per_s,
        )
        digest = content_hash(result.output, recipe.storage_options)
        return Merged(result.output, digest, False, result.seconds, result.input_bytes)
