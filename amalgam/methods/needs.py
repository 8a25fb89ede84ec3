"""What a method needs besides each tensor's inputs; the planner turns each need into passes.

A method lists its needs in ``Method.needs`` (none: one tensor pass). See docs/methods.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch


class Collector(Protocol):
    """Reduces per-tensor summaries of every model's task vectors into a small whole-model
    statistic over ``passes`` streaming passes; the tensor pass reads ``result()`` from
    ``ctx.stats[key]``.

    A pass can be split over workers: each streams its tensors through a ``fork()`` (what the
    earlier passes decided, with empty counts) and the collector ``join``s the forks. The
    counts must add up exactly, so the result does not depend on the split."""

    key: str
    passes: int

    def update(self, pass_: int, deltas: list[torch.Tensor]) -> None: ...

    def fork(self) -> Collector: ...

    def join(self, part: Collector) -> None: ...

    def end_pass(self, pass_: int) -> None: ...

    def result(self) -> Any: ...


@dataclass(frozen=True)
class WholeModelStatistic:
    """Need: whole-model statistics, streamed over every merged tensor before the tensor pass
    (TIES's global top-k threshold, PCB's whole-model order statistics). ``collectors`` gets
    the recipe-wide parameter values and returns the collectors this recipe needs (none: no
    pass)."""

    collectors: Callable[[Any], list[Collector]]  # (TensorParams) -> collectors


@dataclass(frozen=True)
class DataStatistics:
    """Need: per-model statistics from running each model on its data, one artifact per model
    (Fisher diagonals, Gram matrices). ``settings`` maps the shared parameter values to
    (kind, settings); the tensor pass reads ``ctx.statistics`` and ``ctx.model_stats``.
    ``check`` (recipe, one StatisticsInfo per model) runs once the artifacts are resolved,
    before any tensor is merged (e.g. to warn about a setting that swamps a model's statistic)."""

    settings: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]
    check: Callable[[Any, Sequence[Any]], None] | None = None


@dataclass(frozen=True)
class LearnedStatistics:
    """Need: statistics learned jointly from every model and their data (DAM's masks), one
    artifact per model in model order, cached by the learner. ``learn`` gets (recipe, opened
    inputs by label, device) and returns the artifacts' infos; the tensor pass reads them as
    ``ctx.statistics`` and ``ctx.model_stats``. Every model must name ``data``."""

    learn: Callable[[Any, dict[str, Any], str], tuple[Any, ...]]


@dataclass(frozen=True)
class RunningState:
    """Need: a running merge that absorbs one model per step (DESIGN shape 2). ``fn`` gets
    [model] on the first step and [merged, model] after, with ``ctx.stats[STEP_KEY]`` the Step.
    With ``unscaled`` (the step's merged task vector before a whole-model rescale), each step
    first streams the squared norms of that and of the new task vector; the step's divisor is
    then ||unscaled|| / mean_j ||tau_j|| over the absorbed models (OPCM's lambda_t)."""

    unscaled: Callable[..., Any] | None = None  # a MergeFn


@dataclass(frozen=True)
class LearnedCoefficients:
    """Need: merge coefficients (and, for some methods, a mask shared by the task vectors)
    learned through the merged model on every model's unlabelled data before the tensor pass
    (AdaMerging, Concrete); one hash-keyed artifact for the whole recipe
    (``amalgam.statistics.learning``). ``settings`` maps the shared parameter values to the
    learning settings (part of the artifact's key); ``learn`` runs the learning on a
    ``Problem`` and returns a ``Learned``."""

    settings: Callable[[dict[str, Any]], dict[str, Any]]
    learn: Callable[..., Any]  # (Problem, settings, seed) -> Learned


Need = WholeModelStatistic | DataStatistics | LearnedStatistics | RunningState | LearnedCoefficients
N = TypeVar(
    "N", WholeModelStatistic, DataStatistics, LearnedStatistics, RunningState, LearnedCoefficients
)
