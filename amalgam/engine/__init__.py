"""The merge engine: open inputs, plan, gather whole-model statistics, execute, commit."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from amalgam import storage
from amalgam.checkpoint import Checkpoint, open_checkpoint
from amalgam.engine.execute import (
    PREFETCH_BYTES,
    Progress,
    compute_threads,
    gather_stats,
    open_statistics,
    pick_device,
    run_unit,
)
from amalgam.engine.plan import Plan, build_plan
from amalgam.errors import OutputError, RecipeError
from amalgam.recipe import Recipe
from amalgam.writer import INDEX_NAME, CheckpointWriter


class MergeOptions(BaseModel):
    """How to run a recipe (the CLI's flags mirror these fields)."""

    model_config = ConfigDict(extra="forbid")

    output: str | None = None
    executor: Literal["local", "ray"] = "local"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    overwrite: bool = False
    allow_pickle: bool = False
    prefetch_bytes: int = PREFETCH_BYTES
    # Compute threads; default: all cores but one, which is left to reads and writes.
    threads: int | None = Field(default=None, ge=1)
    # Continual methods: the output of an earlier continual merge to absorb the models into.
    continue_from: str | None = None


@dataclass
class MergeResult:
    output: str
    plan: Plan
    seconds: float
    input_bytes: int
    peak_rss_bytes: int

    @property
    def gb_per_s(self) -> float:
        return self.input_bytes / 1e9 / max(self.seconds, 1e-9)


def open_recipe_inputs(recipe: Recipe, allow_pickle: bool) -> dict[str, Checkpoint]:
    """Open base (labelled ``base``) and models lazily, in that order."""
    uris = ([("base", recipe.base)] if recipe.base else []) + [
        (m.label, m.uri) for m in recipe.models
    ]
    return {
        label: open_checkpoint(uri, allow_pickle=allow_pickle, **recipe.storage_options)
        for label, uri in uris
    }


def output_of(recipe: Recipe, options: MergeOptions) -> str:
    """Where the merge goes: ``--output``, else the recipe's ``output``."""
    output = options.output or recipe.output
    if not output:
        raise OutputError("output: no output given (set output: in the recipe or pass --output)")
    return output


def check_output(
    output: str, inputs: dict[str, Checkpoint], overwrite: bool, storage_options: dict
) -> None:
    fs, path = storage.resolve(output, **storage_options)
    for label, ckpt in inputs.items():
        if storage.is_inside(fs, path, ckpt.fs, ckpt.path) or storage.is_inside(
            ckpt.fs, ckpt.path, fs, path
        ):
            raise OutputError(f"{output}: output overlaps input '{label}' ({ckpt.uri})")
    if fs.exists(path) and not overwrite:
        raise OutputError(f"{output}: output exists (pass --overwrite to replace it)")


def plan_recipe(recipe: Recipe, options: MergeOptions | None = None) -> Plan:
    """Validate every input against the recipe and return the plan, reading no tensor (and
    hashing no parent: the plan's metadata then names no parent hashes)."""
    options = options or MergeOptions()
    inputs = open_recipe_inputs(recipe, options.allow_pickle)
    try:
        return _plan(recipe, inputs, options, hash_parents=False)
    finally:
        for c in inputs.values():
            c.close()


def _plan(
    recipe: Recipe, inputs: dict[str, Checkpoint], options: MergeOptions, hash_parents: bool = True
) -> Plan:
    check_output(output_of(recipe, options), inputs, options.overwrite, recipe.storage_options)
    hashes = {label: c.content_hash() for label, c in inputs.items()} if hash_parents else {}
    return build_plan(recipe, inputs, hashes)


def run_merge(
    recipe: Recipe, options: MergeOptions | None = None, progress: Progress | None = None
) -> MergeResult:
    """Merge ``recipe`` into its output folder; nothing is left at the output on failure."""
    options = options or MergeOptions()
    if recipe.method_spec.continual:
        from amalgam.engine.continual import run_continual

        return run_continual(recipe, options, progress)
    if options.continue_from:
        raise RecipeError(f"continue_from: method '{recipe.method}' is not a continual method")
    start = time.perf_counter()
    inputs = open_recipe_inputs(recipe, options.allow_pickle)
    try:
        with compute_threads(options.threads):
            plan = _plan(recipe, inputs, options)
            if recipe.method_spec.statistics is not None:
                from amalgam.statistics.prepare import attach_statistics

                plan = attach_statistics(plan, inputs, options.device)
            device = pick_device(options.device)
            stats = gather_stats(plan, list(inputs.values()), device, progress)
            read = write_output(plan, inputs, stats, options, device, progress)
    finally:
        for c in inputs.values():
            c.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return MergeResult(output_of(recipe, options), plan, time.perf_counter() - start, read, peak)


def write_output(
    plan: Plan,
    inputs: dict[str, Checkpoint],
    stats: dict,
    options: MergeOptions,
    device: torch.device,
    progress: Progress | None,
    extra_json: dict[str, Any] | None = None,
) -> int:
    """Run the plan into its output (shards, index, side files, ``extra_json`` files), committed
    only when all of it is written; returns the input bytes read."""
    recipe = plan.recipe
    output = output_of(recipe, options)
    writer = CheckpointWriter(output, overwrite=options.overwrite, **recipe.storage_options)
    try:
        read = _execute(plan, writer, list(inputs.values()), stats, options, device, progress)
        if len(plan.units) > 1:
            writer.write_json(INDEX_NAME, plan.index())
        _copy_side_files(recipe, inputs, writer)
        for name, obj in (extra_json or {}).items():
            writer.write_json(name, obj)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return read


def _execute(
    plan: Plan,
    writer: CheckpointWriter,
    sources: list[Checkpoint],
    stats: dict,
    options: MergeOptions,
    device,
    progress: Progress | None,
) -> int:
    if options.executor == "ray":
        from amalgam.engine.ray_executor import run_units_ray

        return run_units_ray(
            plan,
            writer.staging_uri,
            stats,
            options.device,
            options.allow_pickle,
            plan.recipe.storage_options,
            storage.amalgam_home(),
            progress,
        )
    read = 0
    statistics = open_statistics(plan, plan.recipe.storage_options)
    try:
        for unit in plan.units:
            shard = writer.shard(unit.file, unit.entries(), plan.metadata)
            read += run_unit(
                plan,
                unit,
                sources,
                shard,
                stats,
                device,
                progress,
                options.prefetch_bytes,
                statistics,
            )
    finally:
        for s in statistics:
            s.close()
    return read


def _copy_side_files(
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


__all__ = ["MergeOptions", "MergeResult", "plan_recipe", "run_merge"]
