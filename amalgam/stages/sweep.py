"""The sweep-candidate stage: merge one grid point and evaluate it against reference scores."""

from __future__ import annotations

from dataclasses import dataclass

from amalgam.engine import MergeOptions
from amalgam.evaluate.report import EvalReport
from amalgam.evaluate.results import ModelResult
from amalgam.fetch import FetchedModel
from amalgam.recipe import Recipe
from amalgam.stages.base import Stage, content_key, execute
from amalgam.stages.evaluate import compare
from amalgam.stages.merge import Merged, MergeInput, MergeStage


@dataclass(frozen=True)
class PointInput:
    """One point's recipe, the inputs' fetch results, the scores of base, experts and champion
    (measured once for every point) and the champion (URI, version)."""

    recipe: Recipe
    inputs: list[FetchedModel]
    references: dict[str, ModelResult]
    champion: tuple[str | None, str | None] = (None, None)

    @property
    def merge(self) -> MergeInput:
        # one compute thread: points run side by side
        return MergeInput(self.recipe, MergeOptions(threads=1), self.inputs)


@dataclass(frozen=True)
class Point:
    merged: Merged
    report: EvalReport


class SweepPointStage(Stage[PointInput, Point]):
    """The point's merge (skipped when its folder already holds it) and its report."""

    name = "sweep-candidate"

    def key(self, inp: PointInput) -> str:
        return content_key(self.name, [MergeStage().key(inp.merge), list(inp.champion)])

    def run(self, inp: PointInput) -> Point:
        merged = execute(MergeStage(), inp.merge)
        report = compare(inp.recipe, merged.output, *inp.champion, inp.references)
        return Point(merged, report)
