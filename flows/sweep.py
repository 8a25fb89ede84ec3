"""sweep: the library's sweep (:func:`amalgam.sweep.run_sweep`) as a flow whose grid points
run side by side on the flow's task runner (Ray, or local threads)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from amalgam.errors import RecipeError
from amalgam.pipeline_config import Grid
from amalgam.recipe import Recipe
from amalgam.storage import amalgam_home
from amalgam.sweep import SweepResult
from amalgam.sweep import run_sweep as sweep_points
from amalgam_stage_tasks.stage import prefect_mapper, prefect_runner, publish


@flow(name="sweep")
def sweep(recipe: Recipe | str, grid: Grid | str) -> SweepResult:
    """Every grid point merged and evaluated side by side on the flow's task runner (see
    :func:`run_sweep`), ranked by ``grid.metric``; the best is registered as candidate.
    ``recipe`` and ``grid``: objects, or the paths of their files (read inside the run; as
    parameters, storage options are stored redacted)."""
    result = sweep_points(recipe, grid, runner=prefect_runner, mapper=prefect_mapper)
    publish(result.report())
    return result


def task_runner(executor: str) -> Any:
    """Ray: the one Ray this process is connected to (``RAY_ADDRESS``, else a local Ray started
    once per process and reused by every flow run); local: threads."""
    if executor == "local":
        return ThreadPoolTaskRunner(max_workers=2)
    if executor != "ray":
        raise RecipeError(f"executor: {executor!r} is neither ray nor local")
    # lazy: Ray takes seconds to import and is needed by the ray executor only
    from prefect_ray import RayTaskRunner

    from amalgam.engine.ray_executor import ensure_ray

    ensure_ray(amalgam_home())  # RayTaskRunner reuses an initialised Ray and leaves it running
    return RayTaskRunner()


def run_sweep(recipe: Recipe | str, grid: Grid | str, executor: str = "ray") -> SweepResult:
    """The sweep flow on ``executor``'s task runner."""
    return sweep.with_options(task_runner=task_runner(executor))(recipe, grid)
