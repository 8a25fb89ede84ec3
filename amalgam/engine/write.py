"""Run a plan's tensor pass into its output: shards on the chosen executor, the index, the side
files; committed only when all of it is written."""

from __future__ import annotations

from typing import Any

from amalgam import storage
from amalgam.checkpoint import Checkpoint
from amalgam.engine.execute import JobContext
from amalgam.engine.executors import Executor
from amalgam.engine.options import MergeOptions, output_of
from amalgam.engine.plan import WorkUnit
from amalgam.recipe import Recipe
from amalgam.writer import INDEX_NAME, CheckpointWriter, shard_header


def write_output(
    ctx: JobContext,
    inputs: dict[str, Checkpoint],
    options: MergeOptions,
    executor: Executor,
    extra_json: dict[str, Any] | None = None,
) -> int:
    """Run the plan into its output on ``executor`` (shards, index, side files, ``extra_json``
    files), committed only when all of it is written, every planned shard is there with its
    planned size and no input changed meanwhile; returns the input bytes read."""
    plan = ctx.plan
    recipe = plan.recipe
    writer = CheckpointWriter(
        output_of(recipe, options),
        overwrite=options.overwrite,
        sources=inputs.values(),  # what was merged is what the provenance names
        **recipe.storage_options,
    )
    try:
        writer.expect({u.file: shard_size(u, plan.metadata) for u in plan.units})
        read = executor.write(ctx, writer, list(inputs.values()))
        if len(plan.units) > 1:
            writer.write_json(INDEX_NAME, plan.index())
        copy_side_files(recipe, inputs, writer)
        for name, obj in (extra_json or {}).items():
            writer.write_json(name, obj)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return read


def shard_size(unit: WorkUnit, metadata: dict[str, str]) -> int:
    """The bytes of ``unit``'s shard file: header and tensors."""
    return len(shard_header(unit.entries(), metadata)) + unit.nbytes


def copy_side_files(
    recipe: Recipe, inputs: dict[str, Checkpoint], writer: CheckpointWriter
) -> None:
    """Copy config and tokenizer files from ``files_from`` (default: base, else first model)."""
    label = recipe.files_from or next(iter(inputs))
    src = inputs[label]
    for name in src.side_files():
        path = storage.join(src.root, name)
        if name == "config.json" and (recipe.dtype or src.config_edited):
            config = dict(src.config or {})
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = recipe.dtype
            writer.write_json(name, config)
        else:
            writer.copy_in(src.fs, path, name)
