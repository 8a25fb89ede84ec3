"""The align stage: check (and, with aligning methods, re-align) the inputs before merging."""

from __future__ import annotations

from amalgam.align import run_align
from amalgam.engine import MergeOptions
from amalgam.recipe import AlignSpec, Recipe
from amalgam.stages.base import Stage, content_key, execute
from amalgam.stages.fetch import Fetched, FetchInput, FetchStage
from amalgam.storage import amalgam_home


class AlignStage(Stage[Fetched, Fetched]):
    """The recipe's align section (a compatibility check when it has none); the merge reads
    whatever the align stage hands on."""

    name = "align"

    def key(self, inp: Fetched) -> str:
        spec = inp.recipe.align or AlignSpec()
        body = [spec.model_dump(mode="json"), inp.hashes()]
        if inp.recipe.extra_tensors != "error":  # the default keeps the keys it always had
            body.append({"extra_tensors": inp.recipe.extra_tensors})
        return content_key(self.name, body)

    def run(self, inp: Fetched) -> Fetched:
        recipe = inp.recipe
        inputs = inp.uris()
        uris = run_align(
            recipe.align or AlignSpec(),
            inputs,
            workdir=str(amalgam_home() / "cache" / "aligned" / self.key(inp)),
            extra_tensors=recipe.extra_tensors,
            stepwise=recipe.method_spec.continual,
            **recipe.storage_options,
        )
        changed = {label: uri for label, uri in uris.items() if uri != inputs[label]}
        return Fetched(recipe, inp.models, {**inp.read_from, **changed}, aligned=True)


def aligned_options(recipe: Recipe, options: MergeOptions, *, stage: bool = False) -> MergeOptions:
    """``options`` reading the recipe's inputs as its align stage hands them on (the fetch and
    align stages run first, reusing aligned copies a former run wrote)."""
    fetched = execute(FetchStage(), FetchInput(recipe, stage, options.allow_pickle))
    return execute(AlignStage(), fetched).merge_options(options)
