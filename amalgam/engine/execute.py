"""Run a plan: read inputs ahead on threads, merge tensor by tensor, stream into shards."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

from amalgam.checkpoint import SAFETENSORS_DTYPES, Checkpoint, open_checkpoint
from amalgam.engine.plan import Plan, TensorJob, WorkUnit
from amalgam.errors import MergeError
from amalgam.merge.base import MergeContext, MergeFn, Method, get_method
from amalgam.merge.params import resolve_params
from amalgam.writer import ShardWriter

Progress = Callable[[int, int], None]  # (input bytes, tensors) done since the last call
PREFETCH_BYTES = 1 << 28  # inputs read ahead of the tensor being merged


@contextmanager
def compute_threads(threads: int | None) -> Iterator[None]:
    """torch's compute threads for one run: ``threads``, by default all cores but one (left to
    reads and writes); the caller's setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeError("device: cuda requested but no CUDA device is available")
    return torch.device(device)


def open_inputs(
    plan: Plan, allow_pickle: bool, storage_options: dict[str, Any]
) -> list[Checkpoint]:
    return [open_checkpoint(u, allow_pickle=allow_pickle, **storage_options) for u in plan.uris]


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
    """The job's input tensors: the reference's alone for a copy, else every input's, checked
    finite (on the reading thread, so the check overlaps the merge of the previous tensor);
    and each model's statistic tensor of the same name, where its artifact holds one."""
    if job.copy:
        return [sources[0].tensor(job.name)], ()
    raw = [s.tensor(job.name) for s in sources]
    check_finite(plan, job, raw)
    stats = tuple(s.tensor(job.name) if job.name in s.tensors else None for s in statistics)
    return raw, stats


def prefetched(
    plan: Plan,
    sources: Sequence[Checkpoint],
    jobs: Sequence[TensorJob],
    budget: int,
    pool: ThreadPoolExecutor,
    statistics: Sequence[Checkpoint] = (),
) -> Iterator[tuple[TensorJob, Read]]:
    """Yield (job, (inputs, statistics)) while later jobs are read on ``pool``: at least one
    job ahead, more while their inputs fit in ``budget`` bytes."""
    queue: deque = deque()
    queued = 0
    it = iter(jobs)
    upcoming = next(it, None)

    def cost(job: TensorJob) -> int:
        if job.copy:
            return sources[0].info(job.name).nbytes
        return sum(s.info(job.name).nbytes for s in sources) + sum(
            s.info(job.name).nbytes for s in statistics if job.name in s.tensors
        )

    while upcoming is not None or queue:
        while upcoming is not None and (not queue or queued + cost(upcoming) <= budget):
            queue.append((upcoming, pool.submit(read_job, plan, sources, upcoming, statistics)))
            queued += cost(upcoming)
            upcoming = next(it, None)
        job, fut = queue.popleft()
        queued -= cost(job)
        yield job, fut.result()


def check_finite(plan: Plan, job: TensorJob, raw: list[torch.Tensor]) -> None:
    """NaN/Inf in an input is an error naming the tensor and model, unless the recipe allows it.

    A finite sum proves the tensor finite (the sum in the stored dtype is vectorised and ~25x
    faster than one in float32; should it overflow, as fp16 can, every entry is checked).
    """
    if plan.recipe.allow_nonfinite:
        return
    for label, x in zip(plan.labels, raw, strict=True):
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            raise MergeError(
                f"tensor '{job.name}' of model '{label}' holds NaN or Inf "
                "(set allow_nonfinite: true to merge it anyway)"
            )


def merge_tensor(
    plan: Plan,
    method: Method,
    job: TensorJob,
    raw: list[torch.Tensor],
    stats: dict[str, Any],
    device: torch.device,
    model_stats: tuple[torch.Tensor | None, ...] = (),
) -> torch.Tensor:
    """One output tensor: inputs in their stored dtype on ``device``, math in float32 inside the
    method, result cast to the planned dtype."""
    if job.copy:
        return raw[0]
    out = apply_method(plan, method, method.fn, job, raw, stats, device, model_stats)
    return out.to(SAFETENSORS_DTYPES[job.dtype]).cpu()


def apply_method(
    plan: Plan,
    method: Method,
    fn: MergeFn,
    job: TensorJob,
    raw: list[torch.Tensor],
    stats: dict[str, Any],
    device: torch.device,
    model_stats: tuple[torch.Tensor | None, ...] = (),
) -> torch.Tensor:
    """``fn`` (the method's math, or a part of it) on one job's inputs moved to ``device``,
    with the job's resolved parameters and context (``model_stats``: each model's statistic
    tensor for this job, for data-driven methods)."""
    tensors = [t.to(device) for t in raw]
    base, inputs = (tensors[0], tensors[1:]) if plan.has_base else (None, tensors)
    params = resolve_params(plan.recipe, method, job.name, plan.num_layers)
    ctx = MergeContext(
        job.name,
        job.layer,
        plan.recipe.seed,
        device,
        stats,
        statistics=plan.statistics,
        model_stats=tuple(None if t is None else t.to(device) for t in model_stats),
    )
    return fn(base, inputs, params, ctx)


def run_unit(
    plan: Plan,
    unit: WorkUnit,
    sources: Sequence[Checkpoint],
    shard: ShardWriter,
    stats: dict[str, Any],
    device: torch.device,
    progress: Progress | None = None,
    prefetch_bytes: int = PREFETCH_BYTES,
    statistics: Sequence[Checkpoint] = (),
) -> int:
    """Merge one shard's tensors in order into ``shard``; returns the input bytes read.
    ``statistics``: the plan's statistics artifacts, opened, read tensor by tensor."""
    method = get_method(plan.recipe.method)
    read = 0
    try:
        with (
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="amalgam-read") as pool,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="amalgam-write") as writer,
        ):
            writes: deque = deque()  # at most two merged tensors wait for the disk
            jobs = prefetched(plan, sources, unit.jobs, prefetch_bytes, pool, statistics)
            for job, (raw, model_stats) in jobs:
                n = sum(t.numel() * t.element_size() for t in raw)
                out = merge_tensor(plan, method, job, raw, stats, device, model_stats)
                del raw, model_stats
                writes.append(writer.submit(shard.write, job.name, out))
                if len(writes) > 2:
                    writes.popleft().result()
                read += n
                if progress:
                    progress(n, 1)
            while writes:
                writes.popleft().result()
    except BaseException:
        shard.discard()
        raise
    shard.close()
    return read


def gather_stats(
    plan: Plan,
    sources: Sequence[Checkpoint],
    device: torch.device,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the method's whole-model statistics passes (streaming) and return their results."""
    method = get_method(plan.recipe.method)
    if method.global_stats is None:
        return {}
    collectors = method.global_stats(resolve_params(plan.recipe, method, None, plan.num_layers))
    jobs = [j for j in plan.jobs if not j.copy]
    results: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="amalgam-stats") as pool:
        for c in collectors:
            for pass_ in range(c.passes):
                for _job, (raw, _) in prefetched(plan, sources, jobs, PREFETCH_BYTES, pool):
                    floats = [t.to(device, torch.float32) for t in raw]
                    base = floats[0] if plan.has_base else torch.zeros_like(floats[0])
                    c.update(pass_, [x - base for x in floats[1 if plan.has_base else 0 :]])
                    if progress:
                        progress(0, 0)
                c.end_pass(pass_)
            results[c.key] = c.result()
    return results
