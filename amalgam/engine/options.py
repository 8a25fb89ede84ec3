"""How to run a merge (the CLI's flags mirror these fields), what a run reports, where it goes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from amalgam.engine.execute import MEMORY_BUDGET, PREFETCH_BYTES, JobContext, Progress
from amalgam.engine.plan import Plan
from amalgam.engine.ray_executor import UNIT_BYTES
from amalgam.errors import OutputError
from amalgam.recipe import Recipe


class MergeOptions(BaseModel):
    """How to run a recipe (the CLI's flags mirror these fields)."""

    model_config = ConfigDict(extra="forbid")

    output: str | None = None
    executor: Literal["local", "ray"] = "local"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    overwrite: bool = False
    allow_pickle: bool = False
    prefetch_bytes: int = PREFETCH_BYTES
    # Tensor bytes held at once (reads ahead, the merge, writes): a tensor whose inputs from
    # every model exceed half of it is merged one model at a time, to the same bytes.
    memory_budget: int = Field(default=MEMORY_BUDGET, gt=0)
    # Compute threads; default: all cores (the fused kernels and torch; reads fault pages in
    # on the read-ahead threads, writes wait on the disk).
    threads: int | None = Field(default=None, ge=1)
    # Continual methods: the output of an earlier continual merge to absorb the models into.
    continue_from: str | None = None
    # Label -> URI to read that input from instead of the recipe's (local copies of staged
    # inputs, aligned copies): the recipe, its hash and the output's lineage keep its own URIs.
    read_from: dict[str, str] = Field(default_factory=dict)
    # The align stage ran (a recipe whose align method rewrites the inputs needs it).
    aligned: bool = False
    # Ray: the input bytes one task reads (a shard is cut into parts of about this much), and
    # the GPUs each task asks for where the cluster has GPUs (None: 1; fractions share one).
    unit_bytes: int = Field(default=UNIT_BYTES, gt=0)
    gpus_per_task: float | None = Field(default=None, gt=0)


@dataclass
class MergeResult:
    output: str
    plan: Plan
    seconds: float
    input_bytes: int
    peak_rss_bytes: int  # this process's (the driver's, under Ray)
    worker_peaks: tuple[int, ...] = ()  # each Ray worker process's peak RSS

    @property
    def worker_peak_sum(self) -> int:
        """At most what the Ray workers held together."""
        return sum(self.worker_peaks)

    @property
    def gb_per_s(self) -> float:
        return self.input_bytes / 1e9 / max(self.seconds, 1e-9)


def output_of(recipe: Recipe, options: MergeOptions) -> str:
    """Where the merge goes: ``--output``, else the recipe's ``output``."""
    output = options.output or recipe.output
    if not output:
        raise OutputError("output: no output given (set output: in the recipe or pass --output)")
    return output


def job_context(
    plan: Plan,
    options: MergeOptions,
    device: torch.device,
    progress: Progress | None = None,
    stats: dict[str, Any] | None = None,
) -> JobContext:
    """The context the passes of ``plan`` run with, as ``options`` say (``device``: the
    resolved ``options.device``)."""
    return JobContext(
        plan=plan,
        method=plan.recipe.method_spec,
        device=device,
        device_name=options.device,
        allow_pickle=options.allow_pickle,
        stats=stats or {},
        prefetch_bytes=options.prefetch_bytes,
        memory_budget=options.memory_budget,
        progress=progress,
    )
