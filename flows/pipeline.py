"""merge_pipeline: the library's pipeline (:func:`amalgam.pipeline.run_pipeline`) as a flow,
each stage a Prefect task."""

from __future__ import annotations

from prefect import flow, get_run_logger

from amalgam.engine import MergeOptions
from amalgam.pipeline import PipelineResult, as_recipe, run_pipeline
from amalgam.recipe import Recipe
from amalgam_stage_tasks.stage import prefect_runner


@flow(name="merge-pipeline", log_prints=True)
def merge_pipeline(
    recipe: Recipe | str,
    output: str | None = None,
    executor: str | None = None,
    stage: bool = False,
    overwrite: bool = False,
) -> PipelineResult:
    """Run a recipe end to end: the merge on ``executor`` (local threads, or ray: one task per
    shard); ``stage`` copies every input to the local cache before merging. ``recipe``: a
    Recipe, or the path of its file, read inside the run (as a parameter, a Recipe's storage
    options are stored redacted)."""
    recipe = as_recipe(recipe)
    options = MergeOptions(
        output=output, executor=executor or recipe.executor or "local", overwrite=overwrite
    )
    result = run_pipeline(recipe, options, stage=stage, runner=prefect_runner)
    get_run_logger().info(
        "candidate %s (%s)%s",
        result.output,
        result.content_hash,
        f", registered as version {result.registered['version']}" if result.registered else "",
    )
    return result
