"""Open a recipe's inputs, check them and the output location, and plan the merge."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from amalgam import storage
from amalgam.adapters import AdapterCheckpoint, open_input
from amalgam.checkpoint import Checkpoint
from amalgam.engine.options import MergeOptions, output_of
from amalgam.engine.plan import Plan, build_plan
from amalgam.engine.stack import stack_inputs
from amalgam.errors import OutputError, PlanError, RecipeError
from amalgam.recipe import Recipe
from amalgam.writer import output_taken


def open_recipe_inputs(recipe: Recipe, options: MergeOptions) -> dict[str, Checkpoint]:
    """Open base (labelled ``base``) and models lazily, in that order; an input named in
    ``options.read_from`` (label -> URI) is read from there instead of the recipe's URI. A PEFT
    adapter opens over its base (``BASE+ADAPTER`` in its URI, else the recipe's base) as a
    dense model. With ``slices`` or ``layer_swap``, the inputs are stacked
    (:func:`amalgam.engine.stack.stack_inputs`)."""
    check_aligned(recipe, options)
    read_from, allow_pickle = options.read_from, options.allow_pickle
    uris = ([("base", recipe.base)] if recipe.base else []) + [
        (m.label, m.uri) for m in recipe.models
    ]
    base = read_from.get("base", recipe.base)
    inputs: dict[str, Checkpoint] = {}
    try:
        for label, uri in uris:
            inputs[label] = open_input(
                read_from.get(label, uri),
                base=base,
                allow_pickle=allow_pickle,
                **recipe.storage_options,
            )
        check_adapters(recipe, inputs)
        if recipe.slices is not None or recipe.layer_swap is not None:
            inputs = stack_inputs(recipe, inputs)
    except BaseException:
        for c in inputs.values():
            c.close()
        raise
    return inputs


def check_aligned(recipe: Recipe, options: MergeOptions) -> None:
    """A recipe whose align method rewrites the inputs merges only what that stage handed on
    (``options.aligned``): the plain inputs would merge into a silently wrong model."""
    align = recipe.align
    if align is not None and align.method != "check" and not options.aligned:
        raise RecipeError(
            f"align.method: {align.method} rewrites the inputs before they merge: run the recipe "
            "through `amalgam merge` or `amalgam run`, which run the align stage first"
        )


def check_adapters(recipe: Recipe, inputs: dict[str, Checkpoint]) -> None:
    """Adapters must name one base model where they name one (``base_model_name_or_path``),
    and the method must read only tensors (a data-driven method runs each model)."""
    adapters = {k: c for k, c in inputs.items() if isinstance(c, AdapterCheckpoint)}
    if not adapters:
        return
    first, *_ = adapters
    if recipe.method_spec.reads_data:
        raise PlanError(
            f"model '{first}' is a LoRA adapter ({adapters[first].adapter.uri}), and method "
            f"'{recipe.method}' runs each model on data: merge the adapter into its base first "
            "(peft merge_and_unload) and list the merged model"
        )
    named = [
        (k, c.adapter_config.base_model_name_or_path)
        for k, c in adapters.items()
        if c.adapter_config.base_model_name_or_path
    ]
    other = next((x for x in named[1:] if x[1] != named[0][1]), None)
    if other is not None:
        (a, base_a), (b, base_b) = named[0], other
        raise PlanError(
            f"adapters of different bases: '{a}' was trained on {base_a} but '{b}' on {base_b} "
            "(base_model_name_or_path in adapter_config.json)"
        )


def check_output(
    output: str, inputs: dict[str, Checkpoint], overwrite: bool, storage_options: dict
) -> None:
    """The output may neither overlap an input nor exist (unless ``overwrite``)."""
    fs, path = storage.resolve(output, **storage_options)
    for label, opened in inputs.items():
        for ckpt in opened.stored_parts():
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
    hashes = parent_hashes(inputs) if hash_parents else {}
    return build_plan(recipe, inputs, hashes)


def parent_hashes(inputs: dict[str, Checkpoint]) -> dict[str, str]:
    """Each input's content hash, the inputs hashed side by side on all cores (sha256 and file
    reads release the GIL; a first merge of uncached inputs otherwise pays one core's sha256
    speed over every input byte)."""
    workers = max(1, min(len(inputs), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="amalgam-hash") as pool:
        digests = pool.map(lambda c: c.content_hash(), inputs.values())
        return dict(zip(inputs, digests, strict=True))


def plan_recipe(recipe: Recipe, options: MergeOptions | None = None) -> Plan:
    """Validate every input against the recipe and return the plan, reading no tensor (and
    hashing no parent: the plan's metadata then names no parent hashes)."""
    options = options or MergeOptions()
    inputs = open_recipe_inputs(recipe, options)
    try:
        return plan_inputs(recipe, inputs, options, hash_parents=False)
    finally:
        for c in inputs.values():
            c.close()
