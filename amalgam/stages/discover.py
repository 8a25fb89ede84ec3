"""The discover stage: the expert checkpoints under a prefix, verified and hashed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from amalgam.discover import discover_models
from amalgam.fetch import FetchedModel
from amalgam.stages.base import Stage, content_key


@dataclass(frozen=True)
class DiscoverInput:
    prefix: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


class DiscoverStage(Stage[DiscoverInput, list[FetchedModel]]):
    """What is under the prefix now: never cached, the listing is the point."""

    name = "discover"

    def key(self, inp: DiscoverInput) -> str:
        return content_key(self.name, inp.prefix)

    def run(self, inp: DiscoverInput) -> list[FetchedModel]:
        return discover_models(inp.prefix, **inp.storage_options)
