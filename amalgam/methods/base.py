"""What a merge method declares: its parameters, its input contract and its per-tensor math."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from amalgam.errors import RecipeError
from amalgam.methods.counter_random import stream_key
from amalgam.methods.needs import (
    DataStatistics,
    LearnedCoefficients,
    LearnedStatistics,
    N,
    Need,
    RunningState,
)

if TYPE_CHECKING:
    from amalgam.methods.accumulate import AccumulatorFactory
    from amalgam.statistics.artifact import StatisticsInfo


@dataclass(frozen=True)
class Param:
    """One parameter: default, whether each model may set its own value, and its valid range."""

    name: str
    default: Any
    help: str
    per_model: bool = False
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] | None = None
    gradient: bool = True  # a list value is interpolated across layer index

    def check(self, value: Any, where: str) -> None:
        """Raise a RecipeError naming ``where`` unless ``value`` is valid (lists: every entry)."""
        if isinstance(value, list):
            if not self.gradient or not value:
                raise RecipeError(f"{where}: a list value is not allowed for '{self.name}'")
            for v in value:
                self.check(v, where)
            return
        if self.kind is bool:
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: expected true/false, got {value!r}")
            return
        if self.kind is str:
            if value not in (self.choices or ()):
                raise RecipeError(
                    f"{where}: expected one of {list(self.choices or ())}, got {value!r}"
                )
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        if self.kind is int and not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        if not math.isfinite(value):
            raise RecipeError(f"{where}: must be finite, got {value!r}")
        too_low = self.low is not None and (
            value < self.low or (self.low_open and value == self.low)
        )
        if too_low or (self.high is not None and value > self.high):
            raise RecipeError(f"{where}: must be in {self.range_text()}, got {value!r}")

    def range_text(self) -> str:
        low = "(-inf" if self.low is None else ("(" if self.low_open else "[") + str(self.low)
        high = "inf)" if self.high is None else f"{self.high}]"
        return f"{low}, {high}"


@dataclass(frozen=True)
class TensorParams:
    """Parameter values resolved for one tensor: shared values and one dict per model."""

    shared: dict[str, Any]
    per_model: tuple[dict[str, Any], ...]

    def each(self, name: str) -> list[Any]:
        return [p[name] for p in self.per_model]


@dataclass
class MergeContext:
    """What a method may know about the tensor it merges."""

    name: str
    layer: int | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stats: dict[str, Any] = field(default_factory=dict)
    # Data-driven methods: each model's statistics artifact, and its statistic tensor for this
    # tensor (None where the artifact holds none), in model order, on the merge device.
    statistics: tuple[StatisticsInfo, ...] = ()
    model_stats: tuple[torch.Tensor | None, ...] = ()
    # The dtype the engine stores this output in: a method whose result is final may return it
    # (rounded as ``Tensor.to`` rounds, as the fused kernels store it) instead of float32. Only
    # the engine's final merge sets it; parts of a merge get float32.
    out_dtype: torch.dtype = torch.float32

    def random_key(self, model_index: int) -> int:
        """The key of the counter-based stream of (recipe seed, tensor name, model index)
        (``counter_random``): random masks drawn from it are the same bytes anywhere."""
        return stream_key(self.seed, self.name, model_index)

    def generator(self, model_index: int) -> torch.Generator:
        """A CPU generator seeded by (recipe seed, tensor name, model index): same bits anywhere
        (for sequential draws such as a randomized SVD's test matrix)."""
        return torch.Generator(device="cpu").manual_seed(
            self.random_key(model_index) & ((1 << 63) - 1)
        )


@dataclass(frozen=True)
class Step:
    """Where a continual merge stands as it absorbs one model (``ctx.stats[STEP_KEY]``)."""

    index: int  # 1 when absorbing the first model
    prev_scale: float = 1.0  # the merged task vector's divisor after the previous step
    scale: float = 1.0  # this step's divisor (whole-model rescale; 1 for methods without one)


STEP_KEY = "continual_step"


# (base, inputs, params, ctx) -> merged tensor. Tensors arrive in their stored dtype (bf16, fp16,
# fp32) on the merge device and must not be modified; methods compute in float32 and return it
# (or ``ctx.out_dtype``, rounded as ``Tensor.to`` rounds).
MergeFn = Callable[
    [torch.Tensor | None, list[torch.Tensor], TensorParams, MergeContext], torch.Tensor
]


@dataclass(frozen=True)
class Method:
    """A registered merge method: its math plus the contract the planner validates up front.

    ``needs`` declares what the method reads besides each tensor's inputs; the planner turns
    each need into passes of the plan (none: one tensor pass)."""

    name: str
    fn: MergeFn
    params: tuple[Param, ...]
    summary: str
    paper: str
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    # Extra recipe checks beyond each parameter's range: returns problems (field: message).
    check_recipe: Callable[[Any], list[str]] | None = None
    needs: tuple[Need, ...] = ()
    # Its math per tensor is dense linear algebra (SVDs, solves), not bound by reading: on a
    # Ray cluster with GPUs its tasks ask for one (docs/scale-out.md).
    gpu_bound: bool = False
    # How to merge a tensor one model at a time (``amalgam.methods.accumulate``), to the same
    # bytes as ``fn``: the engine does when all models' inputs at once exceed its memory budget.
    accumulate: AccumulatorFactory | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def need(self, kind: type[N]) -> N | None:
        """The method's need of type ``kind``, if it declares one."""
        return next((n for n in self.needs if isinstance(n, kind)), None)

    @property
    def single_input(self) -> bool:
        """Whether each output tensor comes from one input alone (no base, one model):
        with slices, one source per slice."""
        return self.max_models == 1 and not self.needs_base

    @property
    def continual(self) -> bool:
        """Whether the method absorbs models one at a time (a RunningState)."""
        return self.need(RunningState) is not None

    @property
    def statistics(self) -> Callable[[dict[str, Any]], tuple[str, dict[str, Any]]] | None:
        """The data statistics' (kind, settings) of the shared parameters, if any are read."""
        need = self.need(DataStatistics)
        return None if need is None else need.settings

    @property
    def learns(self) -> bool:
        """Whether the method learns on every model's data together: coefficients
        (LearnedCoefficients) or per-model artifacts (LearnedStatistics)."""
        return any(self.need(n) is not None for n in (LearnedCoefficients, LearnedStatistics))

    @property
    def reads_data(self) -> bool:
        """Whether each model needs ``data:`` (or, for statistics, ``statistics:``)."""
        return self.statistics is not None or self.learns


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Forget a method (tests register throwaway methods)."""
    REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method ``name`` (importing ``amalgam.methods`` registers every method)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise RecipeError(
            f"method: unknown merge method {name!r}; known: {', '.join(sorted(REGISTRY))}"
        ) from None
