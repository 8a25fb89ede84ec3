"""The register task: one MLflow run per merge, a model version, the ``candidate`` alias."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from amalgam.errors import RecipeError
from amalgam.fetch import FetchedModel
from amalgam.recipe import Recipe, RegisterSpec
from tasks.evaluate import report_dir
from tasks.merge import Merged
from tasks.retry import RETRIES

if TYPE_CHECKING:
    from amalgam.evaluate.report import EvalReport
    from amalgam.registry import Registry

CONTENT_TAG = "amalgam.content_hash"


@dataclass(frozen=True)
class Registered:
    """A registered version: name, version, its run, and whether this run created it."""

    name: str
    version: str
    run_id: str
    created: bool

    def as_dict(self) -> dict:
        return asdict(self)


def registry_for(spec: RegisterSpec) -> Registry:
    """The recipe's registry (the default store under ``$AMALGAM_HOME`` when it names none)."""
    from amalgam.registry import Registry

    return Registry(spec.tracking_uri)


def find_version(registry: Registry, name: str, content_hash: str) -> Registered | None:
    """The version of ``name`` whose model has ``content_hash``, if one is registered."""
    from mlflow.exceptions import MlflowException

    try:
        found = registry.client.search_model_versions(
            f"name = '{name}' and tags.`{CONTENT_TAG}` = '{content_hash}'"
        )
    except MlflowException:
        return None
    if not found:
        return None
    mv = min(found, key=lambda v: int(v.version))
    return Registered(name, str(mv.version), mv.run_id, created=False)


@task(name="register", cache_policy=NO_CACHE, **RETRIES)
def register(
    recipe: Recipe,
    merged: Merged,
    inputs: list[FetchedModel],
    report: EvalReport | None,
    compressed: dict | None = None,
    extra_parents: dict[str, tuple[str, str]] | None = None,
) -> Registered:
    """Log the run (recipe, parents' URIs and hashes, metrics, report, model) and register the
    merge as a version with the ``candidate`` alias. A model already registered under the name
    with the same content hash is not registered again: that version gets the alias."""
    spec = recipe.register
    if spec is None:
        raise RecipeError("register: the recipe has no register section")
    logger = get_run_logger()
    registry = registry_for(spec)
    with registry.lock(spec.model_name):  # two runs with one model register it once
        existing = find_version(registry, spec.model_name, merged.content_hash)
        if existing is not None:
            if registry.alias_version(spec.model_name, "champion") != existing.version:
                registry.set_alias(spec.model_name, "candidate", existing.version)
            logger.info(
                "%s version %s already holds this model (%s): not registered again",
                spec.model_name,
                existing.version,
                merged.content_hash,
            )
            return existing
        parents = {m.label: (m.uri, m.content_hash) for m in inputs} | dict(extra_parents or {})
        tags = {CONTENT_TAG: merged.content_hash}
        if compressed:
            tags |= {f"amalgam.compressed.{k}": str(v) for k, v in compressed.items()}
        files = sorted(report_dir(merged.content_hash).glob("*")) if report is not None else []
        run_id = registry.log_pipeline_run(
            recipe,
            parents=parents,
            merged_uri=merged.output,
            report=report,
            artifacts=files,
            tags=tags,
            experiment=spec.experiment,
            storage_options=recipe.storage_options,
        )
        version = registry.register_version(run_id, spec.model_name)
    logger.info("registered %s version %s (run %s) as candidate", spec.model_name, version, run_id)
    return Registered(spec.model_name, version, run_id, created=True)
