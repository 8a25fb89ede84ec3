"""merge_pipeline: fetch -> align -> merge -> compress -> evaluate -> register, as one flow."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger

from amalgam.engine import MergeOptions
from amalgam.recipe import Recipe, load_recipe
from amalgam.storage import amalgam_home
from tasks.align import align
from tasks.compress import compress
from tasks.evaluate import evaluate
from tasks.fetch import fetch
from tasks.merge import merge
from tasks.register import register


@dataclass
class PipelineResult:
    """What a pipeline run produced: the candidate model, its report, its registry entry."""

    output: str
    content_hash: str
    skipped_merge: bool
    compressed: dict | None = None
    report: dict[str, float] | None = None  # the evaluation's metrics
    registered: dict | None = None
    inputs: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def default_output(recipe: Recipe) -> str:
    """Where a recipe without ``output`` lands: a folder named by the recipe's hash."""
    digest = recipe.hash().removeprefix("sha256:")[:16]
    return str(amalgam_home() / "runs" / digest / "merged")


def as_recipe(recipe: Recipe | str | Path) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def current_champion(recipe: Recipe) -> tuple[str | None, str | None]:
    """(URI, version) of the model the candidate would replace: the evaluate section's
    ``champion``, else the registered model's ``champion`` alias, else none."""
    if recipe.evaluate is not None and recipe.evaluate.champion:
        return recipe.evaluate.champion, None
    if recipe.register is None:
        return None, None
    from tasks.register import registry_for

    registry = registry_for(recipe.register)
    version = registry.alias_version(recipe.register.model_name, "champion")
    if version is None:
        return None, None
    return registry.model_path(recipe.register.model_name, version), version


def run_stages(recipe: Recipe, options: MergeOptions, *, stage: bool = False) -> PipelineResult:
    """The six stages in order, inside the calling flow; the candidate is compared with the
    current champion (negative flips) when there is one."""
    if not (options.output or recipe.output):
        options = options.model_copy(update={"output": default_output(recipe)})
    recipe, inputs = fetch(recipe, stage=stage, allow_pickle=options.allow_pickle)
    recipe = align(recipe)
    merged = merge(recipe, options, inputs)
    candidate = merged.output
    compressed = None
    if recipe.compress is not None:
        compressed = compress(recipe, merged)
    report = None
    if recipe.evaluate is not None:
        champion, version = current_champion(recipe)
        packed = compressed["output"] if compressed else None
        report = evaluate(recipe, candidate, champion, version, compressed=packed)
    registered = None
    if recipe.register is not None:
        registered = register(recipe, merged, inputs, report, compressed).as_dict()
    return PipelineResult(
        candidate,
        merged.content_hash,
        merged.skipped,
        compressed,
        report.metrics() if report is not None else None,
        registered,
        [m.as_dict() for m in inputs],
    )


@flow(name="merge-pipeline", log_prints=True)
def merge_pipeline(
    recipe: Recipe | str,
    output: str | None = None,
    executor: str | None = None,
    stage: bool = False,
    overwrite: bool = False,
) -> PipelineResult:
    """Run a recipe end to end: the merge on ``executor`` (local threads, or ray: one task per
    shard); ``stage`` copies every input to the local cache before merging."""
    recipe = as_recipe(recipe)
    options = MergeOptions(
        output=output, executor=executor or recipe.executor or "local", overwrite=overwrite
    )
    result = run_stages(recipe, options, stage=stage)
    get_run_logger().info(
        "candidate %s (%s)%s",
        result.output,
        result.content_hash,
        f", registered as version {result.registered['version']}" if result.registered else "",
    )
    return result
