"""The fetch stage: every input of a recipe verified, hashed and sized; staged on request."""

from __future__ import annotations

from dataclasses import dataclass, field

from amalgam.engine import MergeOptions
from amalgam.fetch import FetchedModel, fetch_recipe, recipe_inputs, stage_model
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
    """A recipe's inputs as found in storage, and where the merge reads them when not at the
    recipe's URIs (label -> URI: local copies when staged, aligned copies). The recipe stays
    as written, so its hash and the lineage do not depend on staging."""

    recipe: Recipe
    models: list[FetchedModel]
    read_from: dict[str, str] = field(default_factory=dict)
    aligned: bool = False  # the align stage handed these on

    def hashes(self) -> dict[str, str]:
        """Label -> content hash of every input."""
        return {m.label: m.content_hash for m in self.models}

    def uris(self) -> dict[str, str]:
        """Label -> the URI each input is read from."""
        return {label: self.read_from.get(label, uri) for label, uri in recipe_inputs(self.recipe)}

    def merge_options(self, options: MergeOptions) -> MergeOptions:
        """``options`` reading the inputs where this stage found them."""
        read_from = {**options.read_from, **self.read_from}
        return options.model_copy(update={"read_from": read_from, "aligned": self.aligned})


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
        if not inp.stage:
            return Fetched(recipe, fetched)
        cache = amalgam_home() / "cache" / "models"
        local = {m.label: stage_model(m, cache, **recipe.storage_options) for m in fetched}
        return Fetched(recipe, fetched, local)

    def report(self, inp: FetchInput, out: Fetched) -> StageReport:
        rows = [
            {"label": m.label, "uri": m.uri, "content_hash": m.content_hash, "bytes": m.nbytes}
            for m in out.models
        ]
        return StageReport(
            tables={"inputs": rows}, description=f"Inputs of a {inp.recipe.method} merge"
        )
