"""Settings of a Twin-Merging build (the CLI's ``amalgam twin`` flags mirror them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TwinSpec(BaseModel):
    """``rank``: kept singular values per 2-D tensor of each task's exclusive knowledge (all of
    them for a tensor whose smaller side is below ``rank``).
    The router learns from ``router_limit`` records of each task's ``router_split`` in
    ``tasks_dir`` (one task folder per recipe model, named by the model's label) and is
    checked on the other split. ``shared_output``: where the shared merge is kept (default:
    ``<output>.shared``), so a rerun after a kill reuses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(gt=0)
    tasks_dir: str
    router_split: Literal["train", "validation"] = "train"
    router_limit: int | None = Field(default=64, gt=0)
    router_steps: int = Field(default=300, gt=0)
    shared_output: str | None = None
    max_shard_size: int = Field(default=5 * 10**9, gt=0)
