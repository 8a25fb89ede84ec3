"""The merge plan: every output tensor, its inputs checked, grouped into shards, and the passes
that run it (what the method needs, turned into steps an executor runs). Reads no tensor."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch

from amalgam import __version__
from amalgam.adapters import AdapterCheckpoint
from amalgam.align.tensor_sets import TensorSets, tensor_sources
from amalgam.checkpoint import DTYPE_NAMES, Checkpoint, tensor_nbytes
from amalgam.engine.rows import RowGroup, row_groups
from amalgam.engine.stack import describe_stack
from amalgam.errors import PlanError
from amalgam.methods.base import MergeFn, Method, TensorParams
from amalgam.methods.needs import (
    Collector,
    DataStatistics,
    LearnedCoefficients,
    LearnedStatistics,
    RunningState,
    WholeModelStatistic,
)
from amalgam.methods.params import layer_index, resolve_params
from amalgam.recipe import Recipe

T = TypeVar("T")

if TYPE_CHECKING:
    from amalgam.statistics.artifact import StatisticsInfo

MAX_LISTED = 20


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: merged from every input, or copied from one (``source``: its index
    among the plan's inputs; 0, the reference, for non-float buffers)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    copy: bool
    layer: int | None
    source: int = 0

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class WorkUnit:
    """The tensors of one output shard, in file order."""

    file: str
    jobs: tuple[TensorJob, ...]

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)

    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(j.name, j.dtype, j.shape) for j in self.jobs]


@dataclass(frozen=True)
class UnitPart:
    """A run of consecutive tensors of one shard (jobs ``start:stop`` of ``plan.units[unit]``):
    one Ray task's work. Part 0 holds the shard's header; the parts of a shard, in order, are
    the shard's bytes."""

    unit: int
    index: int
    count: int  # parts of this shard
    start: int
    stop: int

    def of(self, plan: Plan) -> WorkUnit:
        """This part's tensors, under its shard's file name."""
        unit = plan.units[self.unit]
        return WorkUnit(unit.file, unit.jobs[self.start : self.stop])


def split_parts(
    plan: Plan, input_bytes: Callable[[TensorJob], int], unit_bytes: int
) -> list[UnitPart]:
    """Every shard of ``plan`` cut into parts of consecutive tensors, each reading at least
    ``unit_bytes`` of inputs (``input_bytes``: a job's) except a shard's last; in plan order.
    The cut depends on the plan and ``unit_bytes`` alone, so every executor cuts alike."""
    parts: list[UnitPart] = []
    for u, unit in enumerate(plan.units):
        cuts, read = [0], 0
        for i, job in enumerate(unit.jobs[:-1], 1):
            read += input_bytes(job)
            if read >= unit_bytes:
                cuts.append(i)
                read = 0
        cuts.append(len(unit.jobs))
        for k, (start, stop) in enumerate(itertools.pairwise(cuts)):
            parts.append(UnitPart(u, k, len(cuts) - 1, start, stop))
    return parts


@dataclass(frozen=True)
class DataStatisticsPass:
    """Find each model's statistics artifact (computed on its data where the recipe names data
    and the cache has none) and check it against the plan."""

    kind: str
    settings: str  # the settings as canonical JSON

    def describe(self) -> str:
        return f"data statistics: {self.kind} {self.settings} for each model"


@dataclass(frozen=True)
class LearnPass:
    """Find the recipe's learned-coefficients artifact (learned through the merged model on
    the models' data where the cache has none); its table reaches the tensor pass in
    ``ctx.stats`` and its masks (if any) as the plan's one statistics artifact."""

    settings: str  # the learning settings as canonical JSON
    learn: Callable[..., object] = field(compare=False, repr=False)

    def describe(self) -> str:
        return f"learned coefficients: {self.settings} on the models' data"


@dataclass(frozen=True)
class LearnedStatisticsPass:
    """Learn statistics from every model and their data together (or reuse the cached
    artifacts), one artifact per model."""

    method: str
    learn: Callable[..., tuple[StatisticsInfo, ...]] = field(compare=False, repr=False)

    def describe(self) -> str:
        return f"learned statistics: {self.method} from every model's data, one per model"


@dataclass(frozen=True)
class WholeModelPass:
    """Stream every merged tensor's task vectors through ``collectors`` (built from the
    recipe-wide parameter values) ``passes`` times; their results reach the tensor pass in
    ``ctx.stats`` under ``keys``."""

    keys: tuple[str, ...]
    passes: int
    collectors: Callable[[TensorParams], list[Collector]] = field(compare=False, repr=False)

    def describe(self) -> str:
        plural = "es" if self.passes != 1 else ""
        return (
            f"whole-model statistics: {', '.join(self.keys)} ({self.passes} streaming pass{plural})"
        )


@dataclass(frozen=True)
class NormPass:
    """Stream the whole-model norms of ``unscaled`` (the step's merge before its rescale) and
    of the new model's task vector; they fix the step's divisor."""

    unscaled: MergeFn = field(compare=False, repr=False)

    def describe(self) -> str:
        return "norms of the unscaled merge and the new task vector"


@dataclass(frozen=True)
class TensorPass:
    """Merge every tensor and stream it into the output's shards (local threads or Ray)."""

    def describe(self) -> str:
        return "tensors: merge each tensor into its shard"


@dataclass(frozen=True)
class AbsorbStep:
    """One continual step: absorb ``model`` into the running merge by its own passes."""

    model: str
    passes: tuple[NormPass | TensorPass, ...]

    def describe(self) -> str:
        return f"absorb '{self.model}': " + "; then ".join(p.describe() for p in self.passes)


Pass = (
    DataStatisticsPass
    | LearnPass
    | LearnedStatisticsPass
    | WholeModelPass
    | NormPass
    | TensorPass
    | AbsorbStep
)


def plan_passes(recipe: Recipe, method: Method) -> tuple[Pass, ...]:
    """The passes that run ``recipe``: one per need the method declares, then the tensor pass;
    for a running state, one step per model, each with its own passes. Reads nothing."""
    running = method.need(RunningState)
    if running is not None:
        norms = () if running.unscaled is None else (NormPass(running.unscaled),)
        return tuple(AbsorbStep(m.label, (*norms, TensorPass())) for m in recipe.models)
    # recipe-wide values: gradients take their first value, overrides do not apply
    shared = resolve_params(recipe, method, None, 1)
    passes: list[Pass] = []
    data = method.need(DataStatistics)
    if data is not None:
        kind, settings = data.settings(shared.shared)
        passes.append(DataStatisticsPass(kind, json.dumps(settings, sort_keys=True)))
    learned = method.need(LearnedCoefficients)
    if learned is not None:
        settings = learned.settings(shared.shared)
        passes.append(LearnPass(json.dumps(settings, sort_keys=True), learned.learn))
    learned = method.need(LearnedStatistics)
    if learned is not None:
        passes.append(LearnedStatisticsPass(method.name, learned.learn))
    whole = method.need(WholeModelStatistic)
    collectors = whole.collectors(shared) if whole is not None else []
    if whole is not None and collectors:
        keys = tuple(c.key for c in collectors)
        count = sum(c.passes for c in collectors)
        passes.append(WholeModelPass(keys, count, whole.collectors))
    return (*passes, TensorPass())


@dataclass(frozen=True)
class Plan:
    """Inputs (base first when there is one), shards, and provenance for the output."""

    recipe: Recipe
    labels: tuple[str, ...]
    uris: tuple[str, ...]
    has_base: bool
    units: tuple[WorkUnit, ...]
    num_layers: int
    metadata: dict[str, str] = field(default_factory=dict)
    # Data-driven methods: one statistics artifact per model (not base), in model order; or,
    # for learned coefficients, the recipe's one learned artifact (its masks).
    statistics: tuple[StatisticsInfo, ...] = ()
    passes: tuple[Pass, ...] = (TensorPass(),)
    # Tensors only some inputs hold (extra_tensors): name -> the input it is copied from
    # unmerged (keep_from_first), and the names left out of the output (drop).
    kept: dict[str, str] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()
    # Inputs that are PEFT adapters (read as base + adapter, tensor by tensor): label -> the
    # adapter's URI.
    adapters: dict[str, str] = field(default_factory=dict)
    # Tensors whose rows only some models own (vocabulary union): name -> its row groups.
    rows: dict[str, tuple[RowGroup, ...]] = field(default_factory=dict)

    @property
    def jobs(self) -> list[TensorJob]:
        return [j for u in self.units for j in u.jobs]

    @property
    def output_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    def index(self) -> dict:
        """The Hugging Face shard index (written last, only for sharded outputs)."""
        return {
            "metadata": {"total_size": self.output_bytes, **self.metadata},
            "weight_map": {j.name: u.file for u in self.units for j in u.jobs},
        }

    def describe(self) -> str:
        lines = [f"method {self.recipe.method}; inputs: {', '.join(self.labels)}"]
        for label, uri in zip(self.labels, self.uris, strict=True):
            ranges = describe_stack(uri)
            if ranges is not None:
                lines.append(f"  '{label}': stacked layers {ranges}")
        for label, uri in self.adapters.items():
            lines.append(f"  '{label}': LoRA adapter {uri}, merged into its base tensor by tensor")
        for u in self.units:
            lines.append(f"  {u.file}: {len(u.jobs)} tensors, {u.nbytes / 1e6:.1f} MB")
        for name, label in self.kept.items():
            lines.append(f"  {name}: copied unmerged from '{label}' (extra_tensors)")
        for name in self.dropped:
            lines.append(f"  {name}: left out, not in every input (extra_tensors: drop)")
        for name, groups in self.rows.items():
            lines.append(f"  {name}: {len(groups)} row groups, each merged over its owners")
        lines.append("passes:")
        lines += [f"  {i}. {p.describe()}" for i, p in enumerate(self.passes, 1)]
        return "\n".join(lines)


def build_plan(
    recipe: Recipe, inputs: dict[str, Checkpoint], parent_hashes: dict[str, str]
) -> Plan:
    """Check every input against the reference (base, else first model) by the inputs' tensor
    rule (:func:`amalgam.align.tensor_sets.tensor_sources`, which the align check applies
    too); one error lists every problem.

    ``inputs`` maps labels to open checkpoints, base first under the label ``base``.
    """
    labels = list(inputs)
    ref = inputs[labels[0]]
    sets = plan_tensors(recipe, inputs)
    if sets.problems:
        problems = [str(p) for p in sets.problems]
        shown = problems[:MAX_LISTED]
        more = len(problems) - len(shown)
        tail = [f"... and {more} more"] if more else []
        raise PlanError("inputs do not fit together:\n  " + "\n  ".join(shown + tail))
    out_dtype = DTYPE_NAMES[getattr(torch, recipe.dtype)] if recipe.dtype else None
    jobs: list[TensorJob] = []
    for s in sets.sources:
        if s.origin == "drop":
            continue
        info = s.info  # a float tensor (merged, or kept unmerged) takes the output dtype
        dtype = out_dtype if out_dtype is not None and info.is_float else info.dtype
        copy, source = s.origin != "merge", labels.index(s.source)
        jobs.append(TensorJob(s.name, info.shape, dtype, copy, layer_index(s.name), source))
    jobs.sort(key=lambda j: j.name)
    layers = [j.layer for j in jobs if j.layer is not None]
    num_layers = _num_layers(ref, layers)
    rows = row_groups(inputs, recipe.base is not None)
    if rows and recipe.method_spec.reads_data:
        raise PlanError(
            f"method {recipe.method} needs data statistics per model; it cannot merge rows only "
            f"some models own ({', '.join(rows)}: align.method vocab)"
        )
    metadata = {
        "format": "pt",
        "amalgam_version": __version__,
        "recipe_hash": recipe.hash(),
        "method": recipe.method,
        "parents": ";".join(f"{k}={v}" for k, v in parent_hashes.items()),
    }
    return Plan(
        recipe,
        tuple(labels),
        tuple(c.uri for c in inputs.values()),
        recipe.base is not None,
        shard_jobs(jobs, recipe.max_shard_size),
        num_layers,
        metadata,
        passes=plan_passes(recipe, recipe.method_spec),
        kept={s.name: s.source for s in sets.taken("keep")},
        dropped=tuple(s.name for s in sets.taken("drop")),
        adapters={k: c.adapter.uri for k, c in inputs.items() if isinstance(c, AdapterCheckpoint)},
        rows=rows,
    )


def plan_tensors(recipe: Recipe, inputs: dict[str, Checkpoint]) -> TensorSets:
    """Where each output tensor of ``recipe`` over ``inputs`` comes from, by the tensor rule."""
    tables = {label: c.tensors for label, c in inputs.items()}
    return tensor_sources(tables, recipe.extra_tensors, stepwise=recipe.method_spec.continual)


def _num_layers(ref: Checkpoint, layers: list[int]) -> int:
    configured = (ref.config or {}).get("num_hidden_layers")
    return int(configured) if configured else (max(layers) + 1 if layers else 1)


def shard_groups(
    items: Sequence[T], nbytes: Callable[[T], int], max_bytes: int
) -> list[tuple[str, list[T]]]:
    """``items`` (in order) grouped into output shards of at most ``max_bytes`` each (a larger
    item gets a shard of its own), with the Hugging Face file name of each shard."""
    groups: list[list[T]] = [[]]
    size = 0
    for item in items:
        n = nbytes(item)
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    count = len(groups)
    return [(f"model-{i + 1:05d}-of-{count:05d}.safetensors", g) for i, g in enumerate(groups)]


def shard_jobs(jobs: list[TensorJob], max_bytes: int) -> tuple[WorkUnit, ...]:
    """Group ``jobs`` (in order) into output shards of at most ``max_bytes`` each."""
    return tuple(
        WorkUnit(file, tuple(group)) for file, group in shard_groups(jobs, _job_bytes, max_bytes)
    )


def _job_bytes(job: TensorJob) -> int:
    return job.nbytes
