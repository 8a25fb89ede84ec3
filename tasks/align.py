"""The align task: check (and, with aligning methods, re-align) the inputs before merging."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from amalgam.fetch import recipe_inputs, with_inputs
from amalgam.recipe import AlignSpec, Recipe
from tasks.retry import RETRIES


@task(name="align", cache_policy=NO_CACHE, **RETRIES)
def align(recipe: Recipe) -> Recipe:
    """Run the recipe's align section (a compatibility check when it has none); returns the
    recipe reading whatever the align stage hands on."""
    from amalgam.align import run_align

    spec = recipe.align or AlignSpec()
    inputs = dict(recipe_inputs(recipe))
    uris = run_align(spec, inputs, **recipe.storage_options)
    return recipe if uris == inputs else with_inputs(recipe, uris)
