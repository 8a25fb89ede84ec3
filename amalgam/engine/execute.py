"""Run a plan's passes over tensors: read inputs ahead on threads, merge tensor by tensor,
stream into shards; and the streaming whole-model passes (statistics, norms)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from amalgam.checkpoint import SAFETENSORS_DTYPES, Checkpoint, open_checkpoint
from amalgam.engine.plan import NormPass, Plan, TensorJob, UnitPart, WholeModelPass, WorkUnit
from amalgam.engine.rows import merge_by_rows
from amalgam.engine.stack import open_any
from amalgam.engine.transfer import DeviceFeed, Shipment, device_feed, to_host
from amalgam.errors import MergeError
from amalgam.methods.base import MergeContext, MergeFn, Method, TensorParams
from amalgam.methods.kernels import merge as fused
from amalgam.methods.needs import Collector
from amalgam.methods.params import resolve_params
from amalgam.writer import ShardWriter

Progress = Callable[[int, int], None]  # (input bytes, tensors) done since the last call
PREFETCH_BYTES = 1 << 28  # inputs read ahead of the tensor being merged
# The tensor bytes one merge process holds (read ahead, in the merge, waiting for the disk),
# besides the interpreter and libraries: a quarter for reads ahead, a quarter for writes,
# half for the tensor in the merge (docs/architecture.md, Memory).
MEMORY_BUDGET = 1 << 30
# Merged one model at a time, a tensor holds three inputs (the base, the model being added, the
# next one read ahead) beside the same float32 buffers as all at once: it saves memory from
# five inputs on (base + 3 in a 1 GiB budget measured 0.97 GB peak for TIES all at once, 1.14
# GB streamed).
STREAM_MIN_INPUTS = 5


@dataclass(frozen=True)
class JobContext:
    """What every pass of one merge (or one continual step) runs with, besides the tensors:
    the plan, the method whose math it runs, the device, and the results of earlier passes
    (``stats``: whole-model statistics and the continual step, as ``ctx.stats``). It travels
    to Ray workers (without ``progress``), so a worker needs no registry lookup."""

    plan: Plan
    method: Method
    device: torch.device
    device_name: str = "auto"  # as requested: each Ray worker resolves it on its own machine
    allow_pickle: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    prefetch_bytes: int = PREFETCH_BYTES
    memory_budget: int = MEMORY_BUDGET
    progress: Progress | None = None

    def params(self, name: str | None) -> TensorParams:
        """The parameter values for tensor ``name`` (None: the recipe-wide values)."""
        return resolve_params(self.plan.recipe, self.method, name, self.plan.num_layers)

    def report(self, nbytes: int, tensors: int) -> None:
        if self.progress:
            self.progress(nbytes, tensors)

    @property
    def read_ahead_bytes(self) -> int:
        """The inputs read ahead: the prefetch budget, within a quarter of the memory budget."""
        return min(self.prefetch_bytes, self.memory_budget // 4)

    @property
    def write_bytes(self) -> int:
        """The merged tensors waiting for the disk: a quarter of the memory budget."""
        return self.memory_budget // 4

    def streams(self, sources: Sequence[Checkpoint], job: TensorJob) -> bool:
        """Whether ``job`` is merged one model at a time (``Method.accumulate``): its inputs
        from every model, in float32, exceed half the memory budget, they are at least
        ``STREAM_MIN_INPUTS``, and the method can (and the tensor has neither row groups nor
        statistics)."""
        if self.method.accumulate is None or job.copy or job.name in self.plan.rows:
            return False
        if self.plan.statistics or len(sources) < STREAM_MIN_INPUTS:
            return False
        return len(sources) * sources[0].info(job.name).numel * 4 > self.memory_budget // 2


def open_inputs(
    plan: Plan, allow_pickle: bool, storage_options: dict[str, Any]
) -> list[Checkpoint]:
    """The plan's inputs in plan order, opened lazily (headers only; an adapter over its base,
    a stacked input over its parts)."""
    return [open_any(u, allow_pickle=allow_pickle, **storage_options) for u in plan.uris]


def open_statistics(plan: Plan, storage_options: dict[str, Any]) -> list[Checkpoint]:
    """The plan's statistics artifacts, opened lazily (headers only)."""
    return [open_checkpoint(s.uri, **storage_options) for s in plan.statistics]


Read = tuple[list[torch.Tensor], tuple[torch.Tensor | None, ...]]


def read_job(
    plan: Plan,
    sources: Sequence[Checkpoint],
    job: TensorJob,
    statistics: Sequence[Checkpoint] = (),
) -> Read:
    """The job's input tensors: its source's alone for a copy, else every input's, checked
    finite (on the reading thread, so the check overlaps the merge of the previous tensor);
    and each model's statistic tensor of the same name, where its artifact holds one. Inputs are
    read as views where a source can (:meth:`Checkpoint.view`), unmapped once dropped."""
    if job.copy:
        raw = [sources[job.source].view(job.name)]
        if raw[0].is_floating_point():  # a float tensor kept unmerged (extra_tensors)
            check_finite(plan, job, raw, (plan.labels[job.source],))
        return raw, ()
    raw = [s.view(job.name) for s in sources]
    check_finite(plan, job, raw)
    stats = tuple(s.tensor(job.name) if job.name in s.tensors else None for s in statistics)
    return raw, stats


def read_input(plan: Plan, sources: Sequence[Checkpoint], job: TensorJob, i: int) -> torch.Tensor:
    """Input ``i``'s tensor of ``job``, checked finite."""
    x = sources[i].view(job.name)
    check_finite(plan, job, [x], (plan.labels[i],))
    return x


def prefetched(
    plan: Plan,
    sources: Sequence[Checkpoint],
    jobs: Sequence[TensorJob],
    budget: int,
    pool: ThreadPoolExecutor,
    statistics: Sequence[Checkpoint] = (),
    streamed: Callable[[TensorJob], bool] = lambda job: False,
    feed: DeviceFeed | None = None,
) -> Iterator[tuple[TensorJob, Read]]:
    """Yield (job, (inputs, statistics)) while later jobs are read on ``pool``: at least one
    job ahead, more while their inputs fit in ``budget`` bytes. A ``streamed`` job is not
    read here (no inputs: its merge reads them one at a time). With a ``feed``, a merged job's
    inputs and statistics are sent to its device by the reading thread too."""
    queue: deque = deque()
    queued = 0
    it = iter(jobs)
    upcoming = next(it, None)

    def read(job: TensorJob) -> Read | tuple[Shipment, Shipment]:
        if streamed(job):
            return [], ()
        raw, stats = read_job(plan, sources, job, statistics)
        if feed is None or job.copy:
            return raw, stats
        return feed.send(raw), feed.send(stats)

    def arrived(got: Read | tuple[Shipment, Shipment]) -> Read:
        raw, stats = got
        if isinstance(raw, Shipment):
            assert feed is not None and isinstance(stats, Shipment)
            return feed.receive(raw), tuple(feed.receive(stats))
        return got

    def cost(job: TensorJob) -> int:
        if streamed(job):
            return 0
        if job.copy:
            return sources[job.source].info(job.name).nbytes
        return sum(s.info(job.name).nbytes for s in sources) + sum(
            s.info(job.name).nbytes for s in statistics if job.name in s.tensors
        )

    while upcoming is not None or queue:
        while upcoming is not None and (not queue or queued + cost(upcoming) <= budget):
            queue.append((upcoming, pool.submit(read, upcoming)))
            queued += cost(upcoming)
            upcoming = next(it, None)
        job, fut = queue.popleft()
        queued -= cost(job)
        yield job, arrived(fut.result())


def check_finite(
    plan: Plan, job: TensorJob, raw: list[torch.Tensor], labels: Sequence[str] | None = None
) -> None:
    """NaN/Inf in an input (``raw``, read from the models ``labels``, default: all the plan's)
    is an error naming the tensor and model, unless the recipe allows it.

    On CPU a kernel reads the exponent bits (``kernels.merge.all_finite``); elsewhere a finite
    sum proves the tensor finite (the sum in the stored dtype is vectorised and ~25x faster
    than one in float32; should it overflow, as fp16 can, every entry is checked).
    """
    if plan.recipe.allow_nonfinite:
        return
    for label, x in zip(plan.labels if labels is None else labels, raw, strict=True):
        if not finite(x):
            raise MergeError(
                f"tensor '{job.name}' of model '{label}' holds NaN or Inf "
                "(set allow_nonfinite: true to merge it anyway)"
            )


def finite(x: torch.Tensor) -> bool:
    """Whether every entry of the float tensor ``x`` is finite."""
    known = fused.all_finite(x)
    if known is not None:
        return known
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def merge_tensor(
    ctx: JobContext,
    job: TensorJob,
    raw: list[torch.Tensor],
    model_stats: tuple[torch.Tensor | None, ...] = (),
) -> torch.Tensor:
    """One output tensor, on the device: inputs in their stored dtype on the device, math in
    float32 inside the method, result cast to the planned dtype (a method may return it
    already: the fused kernels store it as they compute, then the cast is free)."""
    dtype = SAFETENSORS_DTYPES[job.dtype]
    if job.copy:  # as stored, or cast to the output dtype (a float tensor kept unmerged)
        return raw[0].to(dtype)
    groups = ctx.plan.rows.get(job.name)
    if groups:  # rows only some models own: each group over its owners (in float32)

        def merge(blocks: list[torch.Tensor], owners: tuple[int, ...]) -> torch.Tensor:
            return apply_method(ctx, ctx.method.fn, job, blocks, owners=owners)

        out = merge_by_rows(groups, raw, ctx.plan.has_base, merge)
    else:
        out = apply_method(ctx, ctx.method.fn, job, raw, model_stats, out_dtype=dtype)
    return out.to(dtype)


def apply_method(
    ctx: JobContext,
    fn: MergeFn,
    job: TensorJob,
    raw: list[torch.Tensor],
    model_stats: tuple[torch.Tensor | None, ...] = (),
    owners: tuple[int, ...] | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``fn`` (the method's math, or a part of it) on one job's inputs moved to the device,
    with the job's resolved parameters and context (``model_stats``: each model's statistic
    tensor for this job, for data-driven methods; ``owners``: the models ``raw`` holds, by
    index, when not all of them; ``out_dtype``: the dtype the result is stored in, set only
    where it is the job's final output)."""
    plan, device = ctx.plan, ctx.device
    tensors = [t.to(device) for t in raw]
    base, inputs = (tensors[0], tensors[1:]) if plan.has_base else (None, tensors)
    merge_ctx = MergeContext(
        job.name,
        job.layer,
        plan.recipe.seed,
        device,
        ctx.stats,
        statistics=plan.statistics,
        model_stats=tuple(None if t is None else t.to(device) for t in model_stats),
        out_dtype=out_dtype,
    )
    params = ctx.params(job.name)
    if owners is not None:
        params = TensorParams(params.shared, tuple(params.per_model[i] for i in owners))
    return fn(base, inputs, params, merge_ctx)


def stream_tensor(
    ctx: JobContext,
    job: TensorJob,
    sources: Sequence[Checkpoint],
    pool: ThreadPoolExecutor,
    feed: DeviceFeed | None = None,
) -> torch.Tensor:
    """One output tensor (on the device) merged one model at a time (``Method.accumulate``):
    the base, then each model in plan order (``passes`` times), the next one read on ``pool``
    meanwhile (and sent to the device by ``feed``), so at most two models' inputs are held,
    whatever their number."""
    plan, device = ctx.plan, ctx.device
    assert ctx.method.accumulate is not None
    read = partial(read_input, plan, sources, job)
    base = read(0).to(device) if plan.has_base else None
    merge_ctx = MergeContext(job.name, job.layer, plan.recipe.seed, device, ctx.stats)
    acc = ctx.method.accumulate(base, ctx.params(job.name), merge_ctx)
    for _ in range(acc.passes):
        models = range(int(plan.has_base), len(sources))
        for i, x in enumerate(read_ahead(pool, read, models, feed)):
            acc.add(i, x.to(device))
            del x
        acc.end_pass()
    return acc.finish().to(SAFETENSORS_DTYPES[job.dtype])


def read_ahead(
    pool: ThreadPoolExecutor,
    read: Callable[[int], torch.Tensor],
    indices: Iterable[int],
    feed: DeviceFeed | None = None,
) -> Iterator[torch.Tensor]:
    """``read(i)`` for each index in order, the next one read (and sent to the device by
    ``feed``) on ``pool`` while the caller holds this one."""

    def fetch(i: int) -> torch.Tensor | Shipment:
        return read(i) if feed is None else feed.send([read(i)])

    it = iter(indices)
    i = next(it, None)
    pending = None if i is None else pool.submit(fetch, i)
    while pending is not None:
        got = pending.result()
        i = next(it, None)
        pending = None if i is None else pool.submit(fetch, i)
        x = feed.receive(got)[0] if isinstance(got, Shipment) else got
        del got
        yield x
        del x


def run_unit(
    ctx: JobContext,
    unit: WorkUnit,
    sources: Sequence[Checkpoint],
    shard: ShardWriter,
    statistics: Sequence[Checkpoint] = (),
) -> int:
    """Merge one shard's tensors in order into ``shard``; returns the input bytes read.
    ``statistics``: the plan's statistics artifacts, opened, read tensor by tensor."""
    read = 0
    nbytes = input_bytes(sources)
    try:
        with (
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="amalgam-read") as pool,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="amalgam-write") as writer,
        ):
            # at most two merged tensors wait for the disk, within ctx.write_bytes (or one)
            writes: deque = deque()
            waiting = 0
            streamed = partial(ctx.streams, sources)
            feed = device_feed(ctx.device)
            jobs = prefetched(
                ctx.plan, sources, unit.jobs, ctx.read_ahead_bytes, pool, statistics, streamed, feed
            )
            for job, (raw, model_stats) in jobs:
                if streamed(job):
                    out = stream_tensor(ctx, job, sources, pool, feed)
                else:
                    out = merge_tensor(ctx, job, raw, model_stats)
                out = to_host(out, feed)
                del raw, model_stats
                size = out.numel() * out.element_size()
                writes.append((writer.submit(shard.write, job.name, out), size))
                del out  # (it may be an input's view: unmapped once written)
                waiting += size
                while len(writes) > 2 or (waiting > ctx.write_bytes and writes):
                    future, size = writes.popleft()
                    future.result()
                    waiting -= size
                n = nbytes(job)
                read += n
                ctx.report(n, 1)
            while writes:
                writes.popleft()[0].result()
    except BaseException:
        shard.discard()
        raise
    shard.close()
    return read


def merged_inputs(
    ctx: JobContext,
    sources: Sequence[Checkpoint],
    pool: ThreadPoolExecutor,
    jobs: Sequence[TensorJob] | None = None,
) -> Iterator[tuple[TensorJob, list[torch.Tensor]]]:
    """The inputs of every merged (not copied) tensor of ``jobs`` (default: the plan's), in
    order, read ahead on ``pool``."""
    merged = [j for j in (ctx.plan.jobs if jobs is None else jobs) if not j.copy]
    budget, feed = ctx.read_ahead_bytes, device_feed(ctx.device)
    for job, (raw, _) in prefetched(ctx.plan, sources, merged, budget, pool, feed=feed):
        yield job, raw


def input_bytes(sources: Sequence[Checkpoint]) -> Callable[[TensorJob], int]:
    """A job's input bytes: its source's tensor for a copy, else every input's."""

    def nbytes(job: TensorJob) -> int:
        if job.copy:
            return sources[job.source].info(job.name).nbytes
        return sum(s.info(job.name).nbytes for s in sources)

    return nbytes


def collect_part(
    ctx: JobContext,
    collector: Collector,
    pass_index: int,
    sources: Sequence[Checkpoint],
    part: UnitPart,
) -> Collector:
    """One streaming pass of ``collector`` over the task vectors of the part's merged tensors;
    returns the collector."""
    plan, device = ctx.plan, ctx.device
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="amalgam-stats") as pool:
        for _job, raw in merged_inputs(ctx, sources, pool, part.of(plan).jobs):
            floats = [t.to(device, torch.float32) for t in raw]
            base = floats[0] if plan.has_base else torch.zeros_like(floats[0])
            collector.update(pass_index, [x - base for x in floats[1 if plan.has_base else 0 :]])
            ctx.report(0, 0)
    return collector


# (collector, pass) -> one fork of the collector per part, streamed over that part, in part order
ForkRunner = Callable[[Collector, int], list[Collector]]


def run_whole_model_pass(
    ctx: JobContext, pass_: WholeModelPass, run_forks: ForkRunner
) -> dict[str, Any]:
    """Each collector of the pass, streamed pass by pass over every merged tensor's task
    vectors: one fork per part (``run_forks``: here or on Ray), joined in part order, so the
    result is the same on every executor. Returns their results by key."""
    results: dict[str, Any] = {}
    for c in pass_.collectors(ctx.params(None)):
        for i in range(c.passes):
            for fork in run_forks(c, i):
                c.join(fork)
            c.end_pass(i)
        results[c.key] = c.result()
    return results


def norm_terms(
    ctx: JobContext,
    pass_: NormPass,
    sources: Sequence[Checkpoint],
    jobs: Sequence[TensorJob] | None = None,
) -> list[tuple[float, float]]:
    """For each merged tensor of ``jobs`` (default: the plan's), in order: the squared norms of
    the step's unscaled merge and of the new model's task vector (the last input minus the
    base)."""
    device = ctx.device
    terms = []
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="amalgam-norms") as pool:
        for job, raw in merged_inputs(ctx, sources, pool, jobs):
            s = apply_method(ctx, pass_.unscaled, job, raw)
            tau = torch.sub(raw[-1].to(device).float(), raw[0].to(device).float())
            terms.append(
                (
                    float(torch.linalg.vector_norm(s, dtype=torch.float64)) ** 2,
                    float(torch.linalg.vector_norm(tau, dtype=torch.float64)) ** 2,
                )
            )
    return terms


def run_norm_pass(
    ctx: JobContext, pass_: NormPass, sources: Sequence[Checkpoint]
) -> tuple[float, float]:
    """Squared whole-model norms of the step's unscaled merge and of the new model's task
    vector, streamed tensor by tensor."""
    return sum_norms(norm_terms(ctx, pass_, sources))


def sum_norms(terms: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """:func:`norm_terms`' per-tensor terms summed in plan order (float64), as every executor
    does, so the step's divisor is the same bits wherever the terms were computed."""
    merged_sq = task_sq = 0.0
    for m, t in terms:
        merged_sq += m
        task_sq += t
    return merged_sq, task_sq
