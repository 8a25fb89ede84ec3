"""The register task: one MLflow run per merge, a model version, the ``candidate`` alias."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from amalgam.fetch import FetchedModel
from amalgam.recipe import Recipe
from tasks.merge import Merged
from tasks.retry import RETRIES

if TYPE_CHECKING:
    from amalgam.evaluate.report import EvalReport


@task(name="register", cache_policy=NO_CACHE, **RETRIES)
def register(
    recipe: Recipe,
    merged: Merged,
    inputs: list[FetchedModel],
    report: EvalReport | None,
    compressed: dict | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Log the run and register the merge as a version with the ``candidate`` alias. A version
    of the same content already registered under the name is reused, never duplicated."""
    from amalgam.registry import Registry

    spec = recipe.register
    if spec is None:
        raise ValueError("register: the recipe has no register section")
    registry = Registry(spec.tracking_uri, experiment=spec.experiment)
    raise NotImplementedError(registry)
    get_run_logger()
