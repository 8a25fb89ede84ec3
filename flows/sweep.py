"""sweep: merge and evaluate many recipes (methods x parameters) in parallel on Ray, log a
leaderboard to MLflow, register the best as candidate."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from amalgam.engine import MergeOptions
from amalgam.errors import RecipeError
from amalgam.recipe import Recipe, parse_recipe
from amalgam.storage import amalgam_home
from flows.config import Grid, GridPoint
from flows.pipeline import current_champion
from tasks.evaluate import compare, score_all, spec_of, wanted
from tasks.fetch import fetch
from tasks.merge import Merged, merge_or_skip
from tasks.register import register, registry_for
from tasks.retry import RETRIES


@dataclass
class SweepResult:
    """The leaderboard (best first) and the registered version of the best candidate."""

    leaderboard: list[dict] = field(default_factory=list)
    best: dict | None = None
    registered: dict | None = None
    mlflow_run_id: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def point_recipe(recipe: Recipe, point: GridPoint) -> Recipe:
    """``recipe`` with the point's method and parameters (shared ones kept when the method is
    the recipe's own), written to a folder named by its hash; validated like any recipe."""
    params = {**(recipe.params if point.method == recipe.method else {}), **point.params}
    data = recipe.model_dump(mode="json", exclude={"output"}, exclude_none=True)
    data.update(method=point.method, params=params, overrides=[])
    candidate = parse_recipe(data, f"sweep point {point.label}")
    digest = candidate.hash().removeprefix("sha256:")[:16]
    sweep = recipe.hash().removeprefix("sha256:")[:12]
    output = str(amalgam_home() / "sweeps" / sweep / digest)
    return candidate.model_copy(update={"output": output})


@task(name="sweep-candidate", cache_policy=NO_CACHE, **RETRIES)
def run_point(
    recipe: Recipe, inputs: list, references: dict, champion: tuple[str | None, str | None]
) -> tuple[Merged, dict]:
    """Merge one grid point (one compute thread: points run side by side) and evaluate it
    against the reference scores (base, experts, champion) measured once by the flow."""
    merged = merge_or_skip(recipe, MergeOptions(threads=1), inputs)
    report, _ = compare(recipe, merged.output, *champion, references)
    return merged, report.model_dump(mode="json")


def leaderboard_key(row: dict, metric: str) -> float:
    value = row.get(metric)
    return float("-inf") if value is None else value


@flow(name="sweep")
def sweep(recipe: Recipe, grid: Grid) -> SweepResult:
    """Every grid point merged and evaluated side by side on the flow's task runner (see
    :func:`run_sweep`), ranked by ``grid.metric``; the best is registered as candidate."""
    from amalgam.evaluate.report import EvalReport

    logger = get_run_logger()
    spec_of(recipe)
    points = grid.points()
    recipes = [point_recipe(recipe, p) for p in points]
    _, inputs = fetch(recipe)
    champion = current_champion(recipe)
    references = score_all(recipe, wanted(recipe, spec_of(recipe), champion[0], None))
    # transformers resolves its lazy attributes non-atomically: resolve them before threads do
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    futures = [run_point.submit(r, inputs, references, champion) for r in recipes]
    rows, results = [], []
    for point, r, future in zip(points, recipes, futures, strict=True):
        merged, report_data = future.result()
        report = EvalReport.model_validate(report_data)
        results.append((merged, report, r))
        rows.append(
            {
                "candidate": point.label,
                "method": point.method,
                "params": json.dumps(point.params, sort_keys=True),
                "mean_accuracy": report.mean_accuracy,
                "mean_normalized_accuracy": report.mean_normalized_accuracy,
                "perplexity_ratio": report.perplexity_ratio,
                "output": merged.output,
            }
        )
    order = sorted(range(len(rows)), key=lambda i: -leaderboard_key(rows[i], grid.metric))
    rows = [rows[i] for i in order]
    create_table_artifact(key="leaderboard", table=rows, description=f"by {grid.metric}")
    run_id = log_leaderboard(recipe, grid, rows)
    best_merged, best_report, best_recipe = results[order[0]]
    logger.info("best: %s (%s %.4f)", rows[0]["candidate"], grid.metric, rows[0][grid.metric])
    registered = None
    if recipe.register is not None:
        _, best_inputs = fetch(best_recipe)
        registered = register(best_recipe, best_merged, best_inputs, best_report).as_dict()
    return SweepResult(rows, rows[0], registered, run_id)


def task_runner(executor: str) -> Any:
    """Ray: the one Ray this process is connected to (``RAY_ADDRESS``, else a local Ray started
    once per process and reused by every flow run); local: threads."""
    if executor == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=2)
    if executor != "ray":
        raise RecipeError(f"executor: {executor!r} is neither ray nor local")
    from prefect_ray import RayTaskRunner

    from amalgam.engine.ray_executor import ensure_ray

    ensure_ray(amalgam_home())  # RayTaskRunner reuses an initialised Ray and leaves it running
    return RayTaskRunner()


def run_sweep(recipe: Recipe, grid: Grid, executor: str = "ray") -> SweepResult:
    """The sweep flow on ``executor``'s task runner."""
    return sweep.with_options(task_runner=task_runner(executor))(recipe, grid)


def log_leaderboard(recipe: Recipe, grid: Grid, rows: list[dict]) -> str | None:
    """One MLflow run for the sweep: the leaderboard table, the grid, the best's metrics."""
    if recipe.register is None:
        return None
    registry = registry_for(recipe.register)
    client = registry.client
    run = client.create_run(
        registry.experiment_id(recipe.register.experiment),
        run_name="sweep",
        tags={"amalgam.sweep": "true", "amalgam.sweep.metric": grid.metric},
    )
    run_id = run.info.run_id
    try:
        client.log_table(run_id, {k: [r[k] for r in rows] for k in rows[0]}, "leaderboard.json")
        client.log_text(run_id, grid.model_dump_json(indent=1), "grid.json")
        for i, row in enumerate(rows):
            for key in ("mean_accuracy", "mean_normalized_accuracy", "perplexity_ratio"):
                if row[key] is not None:
                    client.log_metric(run_id, key, row[key], step=i)
        client.log_param(run_id, "best", rows[0]["candidate"])
        grid_hash = hashlib.sha256(grid.model_dump_json().encode()).hexdigest()[:16]
        client.log_param(run_id, "grid_hash", grid_hash)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
