"""The fetch task: hash, size and verify every input of a recipe; stage locally on request."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from amalgam.fetch import FetchedModel, fetch_recipe, stage_model, staged_recipe
from amalgam.recipe import Recipe
from amalgam.storage import amalgam_home
from tasks.retry import RETRIES


@task(name="fetch", cache_policy=NO_CACHE, **RETRIES)
def fetch(
    recipe: Recipe, stage: bool = False, allow_pickle: bool = False
) -> tuple[Recipe, list[FetchedModel]]:
    """Verify and hash every input (content hashes are cached on disk, so a retry or re-run
    reads nothing twice); with ``stage``, copy each into the local cache and return the recipe
    rewritten to read the copies. Records a table artifact of inputs, hashes and sizes."""
    fetched = fetch_recipe(recipe, allow_pickle=allow_pickle)
    create_table_artifact(
        key="inputs",
        table=[
            {"label": m.label, "uri": m.uri, "content_hash": m.content_hash, "bytes": m.nbytes}
            for m in fetched
        ],
        description=f"Inputs of a {recipe.method} merge",
    )
    if stage:
        cache = amalgam_home() / "cache" / "models"
        local = {m.label: stage_model(m, cache, **recipe.storage_options) for m in fetched}
        recipe = staged_recipe(recipe, local)
    return recipe, fetched
