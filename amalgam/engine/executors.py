"""Where a merge's passes run: on this process (threads), or as Ray tasks (see
:mod:`amalgam.engine.ray_executor`). Both give the same bytes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from amalgam.checkpoint import Checkpoint
from amalgam.engine.execute import (
    JobContext,
    collect_part,
    input_bytes,
    open_statistics,
    run_norm_pass,
    run_unit,
    run_whole_model_pass,
)
from amalgam.engine.options import MergeOptions, output_of
from amalgam.engine.plan import NormPass, UnitPart, WholeModelPass, split_parts
from amalgam.engine.ray_executor import RayRun, WorkerMemory
from amalgam.methods.needs import Collector
from amalgam.writer import CheckpointWriter


class Executor(Protocol):
    def write(
        self, ctx: JobContext, writer: CheckpointWriter, sources: Sequence[Checkpoint]
    ) -> int:
        """The tensor pass into ``writer``'s staging folder; returns the input bytes read."""
        ...

    def collect(
        self, ctx: JobContext, pass_: WholeModelPass, sources: Sequence[Checkpoint]
    ) -> dict[str, Any]:
        """A whole-model statistics pass; its results by key."""
        ...

    def norms(
        self, ctx: JobContext, pass_: NormPass, sources: Sequence[Checkpoint]
    ) -> tuple[float, float]:
        """A continual step's norm pass: the squared whole-model norms."""
        ...


class LocalExecutor:
    """Every pass on this process: shards in order, each tensor read ahead on threads; the
    statistics passes part by part as on Ray (``parts``), so their sums add up alike."""

    def __init__(self, parts: list[UnitPart]):
        self.parts = parts

    def write(
        self, ctx: JobContext, writer: CheckpointWriter, sources: Sequence[Checkpoint]
    ) -> int:
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

    def collect(
        self, ctx: JobContext, pass_: WholeModelPass, sources: Sequence[Checkpoint]
    ) -> dict[str, Any]:
        def run_forks(c: Collector, p: int) -> list[Collector]:
            return [collect_part(ctx, c.fork(), p, sources, part) for part in self.parts]

        return run_whole_model_pass(ctx, pass_, run_forks)

    def norms(
        self, ctx: JobContext, pass_: NormPass, sources: Sequence[Checkpoint]
    ) -> tuple[float, float]:
        return run_norm_pass(ctx, pass_, sources)


def pick_executor(
    ctx: JobContext,
    inputs: dict[str, Checkpoint],
    options: MergeOptions,
    memory: WorkerMemory,
) -> Executor:
    """The executor ``options`` ask for, set up for ``ctx.plan`` (Ray: the cluster checked,
    the parts cut; its workers' peak memory goes to ``memory``)."""
    parts = split_parts(ctx.plan, input_bytes(list(inputs.values())), options.unit_bytes)
    if options.executor != "ray":
        return LocalExecutor(parts)
    output = output_of(ctx.plan.recipe, options)
    return RayRun(ctx, parts, options.gpus_per_task, output, memory)
