"""Run a plan's tensor pass into its output: shards on the chosen executor, the index, the side
files; committed only when all of it is written."""

from __future__ import annotations

from typing import Any

from amalgam import storage
from amalgam.checkpoint import Checkpoint
from amalgam.engine.execute import JobContext, open_statistics, run_unit
from amalgam.engine.options import MergeOptions, output_of
from amalgam.engine.ray_executor import run_units_ray
from amalgam.recipe import Recipe
from amalgam.writer import INDEX_NAME, CheckpointWriter


def write_output(
    ctx: JobContext,
    inputs: dict[str, Checkpoint],
    options: MergeOptions,
    extra_json: dict[str, Any] | None = None,
) -> int:
    """Run the plan into its output (shards, index, side files, ``extra_json`` files), committed
    only when all of it is written; returns the input bytes read."""
    plan = ctx.plan
    recipe = plan.recipe
    writer = CheckpointWriter(
        output_of(recipe, options), overwrite=options.overwrite, **recipe.storage_options
    )
    try:
        if options.executor == "ray":
            read = run_units_ray(ctx, writer.staging_uri)
        else:
            read = run_units_local(ctx, writer, list(inputs.values()))
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


def run_units_local(ctx: JobContext, writer: CheckpointWriter, sources: list[Checkpoint]) -> int:
    """Every shard in order on this process's threads; returns the input bytes read."""
    plan = ctx.plan
    read = 0
    statistics = open_statistics(plan, plan.recipe.storage_options)
    try:
        for unit in plan.units:
            shard = writer.shard(unit.file, unit.entries(), plan.metadata)
            read += run_unit(ctx, unit, sources, shard, statistics)
    finally:
        for s in statistics:
            s.close()
    return read


def copy_side_files(
    recipe: Recipe, inputs: dict[str, Checkpoint], writer: CheckpointWriter
) -> None:
    """Copy config and tokenizer files from ``files_from`` (default: base, else first model)."""
    label = recipe.files_from or next(iter(inputs))
    src = inputs[label]
    for name in src.side_files():
        path = storage.join(src.root, name)
        if name == "config.json" and recipe.dtype:
            config = dict(src.config or {})
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = recipe.dtype
            writer.write_json(name, config)
        else:
            writer.copy_in(src.fs, path, name)
