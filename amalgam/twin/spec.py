"""Settings of a Twin-Merging build (the CLI's ``amalgam twin`` flags mirror them)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TwinSpec(BaseModel):
    """Kept singular values per 2-D tensor of each task's exclusive knowledge: ``rank`` (all of
    them for a tensor whose smaller side is below it), or the paper's ``share`` of each
    tensor's min(m, n) (floor, at least 1; the reference code keeps 0.1). Give one.
    The router learns from ``router_limit`` records of each task's ``router_split`` in
    ``tasks_dir`` (one task folder per recipe model, named by the model's label) and is
    checked on the other split. ``shared_output``: where the shared merge is kept (default:
    ``<output>.shared``), so a rerun after a kill reuses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int | None = Field(default=None, gt=0)
    share: float | None = Field(default=None, gt=0.0, le=1.0)
    tasks_dir: str
    router_split: Literal["train", "validation"] = "train"
    router_limit: int | None = Field(default=64, gt=0)
    router_steps: int = Field(default=300, gt=0)
    shared_output: str | None = None
    max_shard_size: int = Field(default=5 * 10**9, gt=0)

    @model_validator(mode="after")
    def _one_rank_rule(self) -> TwinSpec:
        if (self.rank is None) == (self.share is None):
            raise ValueError("give exactly one of rank and share")
        return self

    def rank_of(self, shape: tuple[int, ...]) -> int:
        """Singular values kept of a 2-D tensor of ``shape``."""
        side = min(shape)
        if self.rank is not None:
            return min(self.rank, side)
        assert self.share is not None  # the validator: one of the two is set
        return max(1, math.floor(self.share * side))
