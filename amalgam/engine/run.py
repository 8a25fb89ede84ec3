"""Run a recipe: plan it, then run the plan's passes in order on the chosen executor."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import replace

from amalgam.checkpoint import Checkpoint
from amalgam.device import compute_threads, pick_device
from amalgam.engine.continual import run_continual
from amalgam.engine.data_statistics import attach_statistics
from amalgam.engine.execute import JobContext, Progress
from amalgam.engine.executors import Executor, pick_executor
from amalgam.engine.inputs import open_recipe_inputs, plan_inputs
from amalgam.engine.learned import attach_learned
from amalgam.engine.options import MergeOptions, MergeResult, job_context, output_of
from amalgam.engine.plan import (
    AbsorbStep,
    DataStatisticsPass,
    LearnedStatisticsPass,
    LearnPass,
    Pass,
    TensorPass,
    WholeModelPass,
    plan_passes,
)
from amalgam.engine.ray_executor import WorkerMemory
from amalgam.engine.write import write_output
from amalgam.errors import RecipeError
from amalgam.recipe import Recipe

# A pass runner: (pass, context, opened inputs, options, executor) -> (context for the next
# pass, bytes read)
Runner = Callable[
    [Pass, JobContext, dict[str, Checkpoint], MergeOptions, Executor], tuple[JobContext, int]
]


def run_merge(
    recipe: Recipe, options: MergeOptions | None = None, progress: Progress | None = None
) -> MergeResult:
    """Merge ``recipe`` into its output folder (a dense model); nothing is left at the output
    on failure. An adapter output is
    :func:`amalgam.adapters.adapter_output.merge_recipe`'s."""
    options = options or MergeOptions()
    if recipe.output_format != "dense":
        raise RecipeError(
            "output_format: adapter outputs are written by "
            "amalgam.adapters.adapter_output.merge_recipe"
        )
    if any(isinstance(p, AbsorbStep) for p in plan_passes(recipe, recipe.method_spec)):
        # steps absorb one model each, carrying the running state from one to the next
        return run_continual(recipe, options, progress)
    if options.continue_from:
        raise RecipeError(f"continue_from: method '{recipe.method}' is not a continual method")
    start = time.perf_counter()
    inputs = open_recipe_inputs(recipe, options)
    read = 0
    memory = WorkerMemory({})
    try:
        with compute_threads(options.threads, spare=0):
            plan = plan_inputs(recipe, inputs, options)
            ctx = job_context(plan, options, pick_device(options.device), progress)
            executor = pick_executor(ctx, inputs, options, memory)
            for pass_ in plan.passes:
                ctx, n = RUNNERS[type(pass_)](pass_, ctx, inputs, options, executor)
                read += n
    finally:
        for c in inputs.values():
            c.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = time.perf_counter() - start
    return MergeResult(
        output_of(recipe, options), ctx.plan, seconds, read, peak, memory.sorted_peaks()
    )


def _data_statistics(
    pass_: DataStatisticsPass,
    ctx: JobContext,
    inputs: dict[str, Checkpoint],
    options: MergeOptions,
    executor: Executor,
) -> tuple[JobContext, int]:
    plan = attach_statistics(ctx.plan, inputs, pass_, options.device)
    return replace(ctx, plan=plan), 0


def _learn(
    pass_: LearnPass,
    ctx: JobContext,
    inputs: dict[str, Checkpoint],
    options: MergeOptions,
    executor: Executor,
) -> tuple[JobContext, int]:
    plan, stats = attach_learned(ctx.plan, inputs, pass_, options.device)
    return replace(ctx, plan=plan, stats={**ctx.stats, **stats}), 0


def _learned_statistics(
    pass_: LearnedStatisticsPass,
    ctx: JobContext,
    inputs: dict[str, Checkpoint],
    options: MergeOptions,
    executor: Executor,
) -> tuple[JobContext, int]:
    infos = pass_.learn(ctx.plan.recipe, inputs, options.device)
    labels = [m.label for m in ctx.plan.recipe.models]
    provenance = ";".join(f"{k}={i.content_hash}" for k, i in zip(labels, infos, strict=True))
    metadata = {**ctx.plan.metadata, "statistics": provenance}
    return replace(ctx, plan=replace(ctx.plan, statistics=tuple(infos), metadata=metadata)), 0


def _whole_model(
    pass_: WholeModelPass,
    ctx: JobContext,
    inputs: dict[str, Checkpoint],
    options: MergeOptions,
    executor: Executor,
) -> tuple[JobContext, int]:
    stats = executor.collect(ctx, pass_, list(inputs.values()))
    return replace(ctx, stats={**ctx.stats, **stats}), 0


def _tensors(
    pass_: TensorPass,
    ctx: JobContext,
    inputs: dict[str, Checkpoint],
    options: MergeOptions,
    executor: Executor,
) -> tuple[JobContext, int]:
    return ctx, write_output(ctx, inputs, options, executor)


RUNNERS: dict[type, Runner] = {
    DataStatisticsPass: _data_statistics,
    LearnPass: _learn,
    LearnedStatisticsPass: _learned_statistics,
    WholeModelPass: _whole_model,
    TensorPass: _tensors,
}
