"""sweep: merge and evaluate many recipes (methods x parameters), side by side when the caller
maps points in parallel; log a leaderboard to the registry, register the best as candidate."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from amalgam.methods import get_method
from amalgam.pipeline import as_recipe, current_champion
from amalgam.pipeline_config import Grid, GridPoint, load_grid
from amalgam.recipe import Recipe, parse_recipe
from amalgam.stages import (
    FetchInput,
    FetchStage,
    Mapper,
    RegisterInput,
    RegisterStage,
    Runner,
    StageReport,
    execute,
    in_order,
    registry_for,
)
from amalgam.stages.evaluate import score_all, spec_of, wanted
from amalgam.stages.sweep import Point, PointInput, SweepPointStage
from amalgam.storage import amalgam_home

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """The leaderboard (best first) and the registered version of the best candidate."""

    leaderboard: list[dict] = field(default_factory=list)
    best: dict | None = None
    registered: dict | None = None
    mlflow_run_id: str | None = None
    metric: str = field(default="mean_accuracy", repr=False)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "metric"}

    def report(self) -> StageReport:
        return StageReport(
            tables={"leaderboard": self.leaderboard}, description=f"by {self.metric}"
        )


def point_recipe(recipe: Recipe, point: GridPoint) -> Recipe:
    """``recipe`` with the point's method and parameters, written to a folder named by its
    hash; validated like any recipe. The recipe's shared parameters are kept when the method
    is the recipe's own; its overrides keep the parameters the point's method knows."""
    params = {**(recipe.params if point.method == recipe.method else {}), **point.params}
    # python mode: the JSON form redacts the storage options, which the point needs
    data = recipe.model_dump(exclude={"output"}, exclude_none=True)
    data.update(method=point.method, params=params, overrides=point_overrides(recipe, point))
    candidate = parse_recipe(data, f"sweep point {point.label}")
    digest = candidate.hash().removeprefix("sha256:")[:16]
    sweep = recipe.hash().removeprefix("sha256:")[:12]
    output = str(amalgam_home() / "sweeps" / sweep / digest)
    return candidate.model_copy(update={"output": output})


def point_overrides(recipe: Recipe, point: GridPoint) -> list[dict]:
    """The recipe's overrides as the point's method reads them: parameters it does not know
    left out, and an override left with none dropped (a TSV-M recipe's ``svd: none`` on the
    vocabulary tables holds for its own points, not for a TIES point of the same sweep)."""
    method = get_method(point.method)
    kept = []
    for override in recipe.overrides:
        params = {k: v for k, v in override.params.items() if method.param(k)}
        models = {
            label: known
            for label, values in override.models.items()
            if (known := {k: v for k, v in values.items() if method.param(k)})
        }
        if params or models:
            kept.append({"match": override.match, "params": params, "models": models})
    return kept


def leaderboard_key(row: dict, metric: str) -> float:
    value = row.get(metric)
    return float("-inf") if value is None else value


def leaderboard_row(point: GridPoint, outcome: Point) -> dict:
    report = outcome.report
    return {
        "candidate": point.label,
        "method": point.method,
        "params": json.dumps(point.params, sort_keys=True),
        "mean_accuracy": report.mean_accuracy,
        "mean_normalized_accuracy": report.mean_normalized_accuracy,
        "perplexity_ratio": report.perplexity_ratio,
        "output": outcome.merged.output,
    }


def run_sweep(
    recipe: Recipe | str | Path,
    grid: Grid | str | Path,
    runner: Runner = execute,
    mapper: Mapper | None = None,
) -> SweepResult:
    """Every grid point merged and evaluated (``mapper`` runs the points, side by side when
    it can; default: one after another through ``runner``), ranked by ``grid.metric``; the
    leaderboard is logged to the recipe's registry and the best registered as candidate.
    Base, expert and champion scores are measured once, before the points. ``recipe`` and
    ``grid`` are objects or the paths of their YAML files."""
    recipe = as_recipe(recipe)
    grid = grid if isinstance(grid, Grid) else load_grid(grid)
    spec = spec_of(recipe)
    points = grid.points()
    recipes = [point_recipe(recipe, p) for p in points]
    inputs = runner(FetchStage(), FetchInput(recipe)).models
    champion = current_champion(recipe)
    references = score_all(recipe, wanted(recipe, spec, champion[0], None), runner)
    # transformers resolves its lazy attributes non-atomically: resolve them before threads do
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  # lazy: 2 s

    jobs = [PointInput(r, inputs, references, champion) for r in recipes]
    outcomes: list[Point] = (mapper or in_order(runner))(SweepPointStage(), jobs)
    rows = [leaderboard_row(p, o) for p, o in zip(points, outcomes, strict=True)]
    order = sorted(range(len(rows)), key=lambda i: -leaderboard_key(rows[i], grid.metric))
    rows = [rows[i] for i in order]
    run_id = None
    if recipe.register is not None:
        registry = registry_for(recipe.register)
        run_id = registry.log_leaderboard(
            recipe.register.experiment,
            rows,
            metric=grid.metric,
            grid=grid.model_dump(mode="json"),
        )
    best, best_recipe = outcomes[order[0]], recipes[order[0]]
    log.info("best: %s (%s %.4f)", rows[0]["candidate"], grid.metric, rows[0][grid.metric])
    registered = None
    if recipe.register is not None:
        best_inputs = runner(FetchStage(), FetchInput(best_recipe)).models
        entry = RegisterInput(best_recipe, best.merged, best_inputs, best.report)
        registered = runner(RegisterStage(), entry).as_dict()
    return SweepResult(rows, rows[0], registered, run_id, grid.metric)
