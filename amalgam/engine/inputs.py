"""Open a recipe's inputs, check them and the output location, and plan the merge."""

from __future__ import annotations

from amalgam import storage
from amalgam.checkpoint import Checkpoint, open_checkpoint
from amalgam.engine.options import MergeOptions, output_of
from amalgam.engine.plan import Plan, build_plan
from amalgam.errors import OutputError
from amalgam.recipe import Recipe
from amalgam.writer import output_taken


def open_recipe_inputs(recipe: Recipe, allow_pickle: bool) -> dict[str, Checkpoint]:
    """Open base (labelled ``base``) and models lazily, in that order."""
    uris = ([("base", recipe.base)] if recipe.base else []) + [
        (m.label, m.uri) for m in recipe.models
    ]
    return {
        label: open_checkpoint(uri, allow_pickle=allow_pickle, **recipe.storage_options)
        for label, uri in uris
    }


def check_output(
    output: str, inputs: dict[str, Checkpoint], overwrite: bool, storage_options: dict
) -> None:
    """The output may neither overlap an input nor exist (unless ``overwrite``)."""
    fs, path = storage.resolve(output, **storage_options)
    for label, ckpt in inputs.items():
        if storage.is_inside(fs, path, ckpt.fs, ckpt.path) or storage.is_inside(
            ckpt.fs, ckpt.path, fs, path
        ):
            raise OutputError(f"{output}: output overlaps input '{label}' ({ckpt.uri})")
    if output_taken(fs, path) and not overwrite:
        raise OutputError(f"{output}: output exists (pass --overwrite to replace it)")


def plan_inputs(
    recipe: Recipe, inputs: dict[str, Checkpoint], options: MergeOptions, hash_parents: bool = True
) -> Plan:
    """Check the output location, then plan ``recipe`` over its opened ``inputs`` (with the
    parents' content hashes in the output's provenance unless ``hash_parents`` is false)."""
    check_output(output_of(recipe, options), inputs, options.overwrite, recipe.storage_options)
    hashes = {label: c.content_hash() for label, c in inputs.items()} if hash_parents else {}
    return build_plan(recipe, inputs, hashes)


def plan_recipe(recipe: Recipe, options: MergeOptions | None = None) -> Plan:
    """Validate every input against the recipe and return the plan, reading no tensor (and
    hashing no parent: the plan's metadata then names no parent hashes)."""
    options = options or MergeOptions()
    inputs = open_recipe_inputs(recipe, options.allow_pickle)
    try:
        return plan_inputs(recipe, inputs, options, hash_parents=False)
    finally:
        for c in inputs.values():
            c.close()
