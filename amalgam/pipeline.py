"""The merge pipeline: fetch -> align -> merge -> compress -> evaluate -> register, in order.

:func:`run_pipeline` is the one place the stages are sequenced. Each stage runs through a
``runner``: :func:`amalgam.stages.execute` by default (a notebook, a Ray job: skip/resume,
score cache and lineage included), or an orchestrator's wrapper (``flows/pipeline.py`` passes
Prefect's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from amalgam.engine import MergeOptions
from amalgam.recipe import Recipe, load_recipe
from amalgam.registry import CHAMPION
from amalgam.stages.align import AlignStage
from amalgam.stages.base import Runner, execute
from amalgam.stages.compress import CompressInput, CompressStage
from amalgam.stages.evaluate import EvaluateInput, EvaluateStage
from amalgam.stages.fetch import FetchInput, FetchStage
from amalgam.stages.merge import MergeInput, MergeStage
from amalgam.stages.register import RegisterInput, RegisterStage, registry_for
from amalgam.storage import amalgam_home


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
    registry = registry_for(recipe.register)
    version = registry.alias_version(recipe.register.model_name, CHAMPION)
    if version is None:
        return None, None
    return registry.model_path(recipe.register.model_name, version), version


def run_pipeline(
    recipe: Recipe | str | Path,
    options: MergeOptions | None = None,
    *,
    stage: bool = False,
    runner: Runner = execute,
) -> PipelineResult:
    """The six stages in order; compress, evaluate and register when the recipe has their
    sections. The candidate is compared with the current champion (negative flips) when there
    is one. ``stage`` copies every input to the local cache before merging."""
    recipe = as_recipe(recipe)
    options = options or MergeOptions()
    if not (options.output or recipe.output):
        options = options.model_copy(update={"output": default_output(recipe)})
    fetched = runner(FetchStage(), FetchInput(recipe, stage, options.allow_pickle))
    fetched = runner(AlignStage(), fetched)
    recipe, inputs = fetched.recipe, fetched.models
    merged = runner(MergeStage(), MergeInput(recipe, fetched.merge_options(options), inputs))
    compressed = None
    if recipe.compress is not None:
        compressed = runner(CompressStage(), CompressInput(recipe, merged, inputs)).as_dict()
    report = None
    if recipe.evaluate is not None:
        champion, version = current_champion(recipe)
        # TALL storage holds the experts, not the merge: nothing of it to score as a candidate
        tall = recipe.compress is not None and recipe.compress.method == "tall"
        packed = compressed["output"] if compressed and not tall else None
        evaluate = EvaluateInput(recipe, merged.output, champion, version, packed)
        report = runner(EvaluateStage(runner), evaluate)
    registered = None
    if recipe.register is not None:
        entry = RegisterInput(recipe, merged, inputs, report, compressed)
        registered = runner(RegisterStage(), entry).as_dict()
    return PipelineResult(
        merged.output,
        merged.content_hash,
        merged.skipped,
        compressed,
        report.metrics() if report is not None else None,
        registered,
        [m.as_dict() for m in inputs],
    )
