"""The fetch stage: every input of a recipe verified, hashed and sized; staged on request."""

from __future__ import annotations

from dataclasses import dataclass

from amalgam.fetch import FetchedModel, fetch_recipe, recipe_inputs, stage_model, staged_recipe
from amalgam.recipe import Recipe
from amalgam.stages.base import Stage, StageReport, content_key
from amalgam.storage import amalgam_home


@dataclass(frozen=True)
class FetchInput:
    recipe: Recipe
    stage: bool = False  # copy every input to the local cache and read the copies
    allow_pickle: bool = False


@dataclass(frozen=True)
class Fetched:
    """A recipe's inputs as found in storage, and the recipe that reads them (the local copies
    when staged)."""

    recipe: Recipe
    models: list[FetchedModel]

    def hashes(self) -> dict[str, str]:
        """Label -> content hash of every input."""
        return {m.label: m.content_hash for m in self.models}


class FetchStage(Stage[FetchInput, Fetched]):
    """Content hashes are cached on disk by file stamp, so a re-run reads nothing twice."""

    name = "fetch"

    def key(self, inp: FetchInput) -> str:
        # what to fetch is named by location: the content is what this stage finds out
        body = [recipe_inputs(inp.recipe), inp.stage, inp.allow_pickle]
        return content_key(self.name, body)

    def run(self, inp: FetchInput) -> Fetched:
        recipe = inp.recipe
        fetched = fetch_recipe(recipe, allow_pickle=inp.allow_pickle)
        if inp.stage:
            cache = amalgam_home() / "cache" / "models"
            local = {m.label: stage_model(m, cache, **recipe.storage_options) for m in fetched}
            recipe = staged_recipe(recipe, local)
        return Fetched(recipe, fetched)

    def report(self, inp: FetchInput, out: Fetched) -> StageReport:
        rows = [
            {"label": m.label, "uri": m.uri, "content_hash": m.content_hash, "bytes": m.nbytes}
            for m in out.models
        ]
        return StageReport(
            tables={"inputs": rows}, description=f"Inputs of a {inp.recipe.method} merge"
        )
