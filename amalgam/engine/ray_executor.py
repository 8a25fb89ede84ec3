"""Ray executor: a merge's passes cut into parts of about ``unit_bytes`` of inputs, one Ray
task each; every worker reads its inputs from storage itself.

- The tensor pass: a part's tensors go to a part file in the staging folder (a shard of one
  part is written whole); the driver appends each shard's parts in order as they finish,
  checking each against the size and sha256 its worker reported (:class:`ShardAssembler`).
- The statistics passes: each task streams its part's task vectors through a fork of the
  pass's collectors and returns it; the driver joins the forks (exact integer counts, so the
  result does not depend on which node ran what). The continual norm pass returns each
  tensor's squared norms, summed by the driver in plan order as the local executor does.

A worker that dies (killed, out of memory, its node lost) has its task run again by Ray, up to
:data:`UNIT_RETRIES` times (a part file is written again from its start). An error raised by
the merge itself is not retried. See docs/scale-out.md."""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from amalgam import storage
from amalgam.checkpoint import Checkpoint
from amalgam.device import pick_device
from amalgam.engine.execute import (
    JobContext,
    collect_part,
    norm_terms,
    open_inputs,
    open_statistics,
    run_unit,
    run_whole_model_pass,
    sum_norms,
)
from amalgam.engine.plan import NormPass, UnitPart, WholeModelPass
from amalgam.errors import AmalgamError, MergeError
from amalgam.methods.needs import Collector
from amalgam.writer import CheckpointWriter, ShardAssembler, ShardWriter, Written

T = TypeVar("T")
UNIT_RETRIES = 3  # runs of a part's task after the first, when its worker dies
UNIT_BYTES = 256 << 20  # inputs one task reads, by default
ASSEMBLERS = 8  # shards the driver puts together at once

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def ensure_ray(home: Path) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray on loopback (once per process)."""
    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)
    # lazy: Ray takes seconds to import and only the Ray executor needs it
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    temp = home / "ray"
    temp.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=str(temp), log_to_driver=False
    )


@dataclass(frozen=True)
class TaskResult:
    """What a task sends back: its result, the input bytes it read, and its worker's peak RSS
    (keyed by node and process, so the driver can report every worker's)."""

    value: Any
    read: int
    worker: tuple[str, int]
    peak_rss: int


@dataclass
class WorkerMemory:
    """Peak RSS of every Ray worker process that ran a task of this merge."""

    peaks: dict[tuple[str, int], int]

    def add(self, r: TaskResult) -> None:
        self.peaks[r.worker] = max(self.peaks.get(r.worker, 0), r.peak_rss)

    def sorted_peaks(self) -> tuple[int, ...]:
        return tuple(sorted(self.peaks.values(), reverse=True))


@contextlib.contextmanager
def _opened(ctx: JobContext) -> Iterator[tuple[JobContext, list[Checkpoint], list[Checkpoint]]]:
    """On a worker: the context with its device (the CPU unless Ray gave the task a GPU, so a
    task computes alike on any node), the inputs and statistics opened, closed after."""
    # lazy: runs on a Ray worker, where ray is imported already
    import ray

    device = ctx.device_name if ray.get_gpu_ids() else "cpu"
    ctx = replace(ctx, device=pick_device(device))
    so = ctx.plan.recipe.storage_options
    sources = open_inputs(ctx.plan, ctx.allow_pickle, so)
    statistics = open_statistics(ctx.plan, so)
    try:
        yield ctx, sources, statistics
    finally:
        for s in sources + statistics:
            s.close()


def _result(value: Any, read: int) -> TaskResult:
    # lazy: runs on a Ray worker, where ray is imported already
    import ray

    node = ray.get_runtime_context().get_node_id()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return TaskResult(value, read, (node, os.getpid()), peak)


def _write_part(ctx: JobContext, part: UnitPart, uri: str) -> TaskResult:
    """Task: merge the part's tensors into the file at ``uri``."""
    with _opened(ctx) as (ctx, sources, statistics):
        unit = ctx.plan.units[part.unit]
        fs, path = storage.resolve(uri, **ctx.plan.recipe.storage_options)
        span = (part.start, part.stop)
        shard = ShardWriter(fs, path, unit.entries(), ctx.plan.metadata, span)
        read = run_unit(ctx, part.of(ctx.plan), sources, shard, statistics)
    assert shard.digest is not None  # closed by run_unit
    return _result((shard.nbytes, shard.digest), read)


def _collect_part(
    ctx: JobContext, part: UnitPart, pass_index: int, collector: Collector
) -> TaskResult:
    """Task: stream the part's merged tensors through ``collector`` (a fork)."""
    with _opened(ctx) as (ctx, sources, _):
        collect_part(ctx, collector, pass_index, sources, part)
    return _result(collector, 0)


def _norm_part(ctx: JobContext, part: UnitPart, pass_: NormPass) -> TaskResult:
    """Task: each merged tensor's squared norms (see :func:`norm_terms`)."""
    with _opened(ctx) as (ctx, sources, _):
        terms = norm_terms(ctx, pass_, sources, part.of(ctx.plan).jobs)
    return _result(terms, 0)


class RayRun:
    """The Ray side of one merge (or continual step): the cluster checked once, a task per
    part, the context put in the object store once per pass."""

    def __init__(
        self,
        ctx: JobContext,
        parts: list[UnitPart],
        gpus_per_task: float | None,
        output: str,
        memory: WorkerMemory,
    ):
        ensure_ray(storage.amalgam_home())
        # lazy: Ray takes seconds to import and only this executor needs it
        import ray

        self.ray = ray
        check_shared_storage(ray, ctx, output)
        self.memory = memory
        self.parts = parts
        self.files = [u.file for u in ctx.plan.units]
        self.gpus = _gpus(ray, ctx, gpus_per_task)

    def map(
        self, fn: Callable[..., TaskResult], ctx: JobContext, args: Sequence[tuple]
    ) -> Iterator[tuple[int, TaskResult]]:
        """Run ``fn(ctx, *args[i])`` for every i as Ray tasks; yield (i, result) as each ends.
        The first failure cancels the rest and is raised (the merge's own error as itself)."""
        ray = self.ray
        task = ray.remote(num_cpus=1, num_gpus=self.gpus, max_retries=UNIT_RETRIES)(fn)
        shipped = ray.put(replace(ctx, progress=None))
        pending = {task.remote(shipped, *a): i for i, a in enumerate(args)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayError as exc:
                _stop(ray, list(pending))
                raise _task_error(ray, exc, self._describe(args[i])) from None
            self.memory.add(result)
            yield i, result

    def _describe(self, args: tuple) -> str:
        part = args[0]
        return f"{self.files[part.unit]} (part {part.index + 1} of {part.count})"

    def write(
        self, ctx: JobContext, writer: CheckpointWriter, sources: Sequence[Checkpoint]
    ) -> int:
        """The tensor pass into ``writer``'s staging folder; returns the input bytes read."""
        units = ctx.plan.units
        targets = [
            writer.part_uri(units[p.unit].file, p.index)
            if p.count > 1
            else storage.join(writer.staging_uri, units[p.unit].file)
            for p in self.parts
        ]
        assemblers: dict[int, ShardAssembler] = {}
        appends: list[Future] = []
        read = 0
        # shards are put together on threads (hashing releases the GIL), several at once
        with ThreadPoolExecutor(ASSEMBLERS, thread_name_prefix="amalgam-assemble") as pool:
            for i, r in self.map(_write_part, ctx, list(zip(self.parts, targets, strict=True))):
                part, (nbytes, digest) = self.parts[i], r.value
                file = units[part.unit].file
                if part.count == 1:
                    writer.written(file, nbytes, digest)
                else:
                    if part.unit not in assemblers:
                        assemblers[part.unit] = writer.assembler(file, part.count)
                    written = Written(writer.part_path(file, part.index), nbytes, digest)
                    appends.append(pool.submit(assemblers[part.unit].add, part.index, written))
                read += r.read
                ctx.report(r.read, part.stop - part.start)
            for done in appends:
                done.result()
        return read

    def collect(
        self, ctx: JobContext, pass_: WholeModelPass, sources: Sequence[Checkpoint]
    ) -> dict[str, Any]:
        """The whole-model pass, a task per part on a fork of the collector."""

        def run_forks(c: Collector, p: int) -> list[Collector]:
            args = [(part, p, c.fork()) for part in self.parts]
            forks = dict((i, r.value) for i, r in self.map(_collect_part, ctx, args))
            ctx.report(0, 0)
            return [forks[i] for i in range(len(args))]

        return run_whole_model_pass(ctx, pass_, run_forks)

    def norms(
        self, ctx: JobContext, pass_: NormPass, sources: Sequence[Checkpoint]
    ) -> tuple[float, float]:
        """The continual norm pass: per-tensor terms from every part, summed in plan order."""
        args = [(p, pass_) for p in self.parts]
        by_part = {i: r.value for i, r in self.map(_norm_part, ctx, args)}
        return sum_norms(t for i in sorted(by_part) for t in by_part[i])


def _stop(ray: Any, refs: list[Any]) -> None:
    """End the tasks of ``refs`` and wait for them: none may still write into a staging folder
    the caller is about to remove, nor leave an unread error for Ray to print at exit."""
    for ref in refs:
        ray.cancel(ref, force=True)
    for ref in refs:
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(ref)


def run_task(fn: Callable[..., T], *args: Any, gpu: bool, what: str, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` as one Ray task on the cluster (``RAY_ADDRESS``, else a local
    Ray), run again when its worker dies; with ``gpu``, on a GPU node where the cluster has
    GPUs. ``what`` names the work in an error."""
    ensure_ray(storage.amalgam_home())
    # lazy: Ray takes seconds to import and only the Ray executor needs it
    import ray

    gpus = 1 if gpu and ray.cluster_resources().get("GPU", 0) > 0 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=UNIT_RETRIES)(fn)
    try:
        return ray.get(task.remote(*args, **kwargs))
    except ray.exceptions.RayError as exc:
        raise _task_error(ray, exc, what) from None


def alive_nodes(ray: Any) -> int:
    """The nodes of the connected Ray cluster that are alive."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_shared_storage(ray: Any, ctx: JobContext, output: str) -> None:
    """On a cluster of more than one node every path a task reads or writes must be on storage
    all nodes reach: local paths (the output, inputs, statistics artifacts) are refused."""
    nodes = alive_nodes(ray)
    if nodes < 2:
        return
    uris = [output, *ctx.plan.uris, *(s.uri for s in ctx.plan.statistics)]
    local = storage.local_uris(uris, **ctx.plan.recipe.storage_options)
    if local:
        raise MergeError(
            f"the Ray cluster has {nodes} nodes, and these are local paths its workers cannot "
            f"all reach: {', '.join(local)} (use storage every node reaches, such as s3://...; "
            "statistics artifacts too: compute them first with `amalgam stats --output "
            "s3://...` and name them in models[i].statistics)"
        )


def _gpus(ray: Any, ctx: JobContext, gpus_per_task: float | None) -> float:
    """GPUs per task: none on a cluster without GPUs or for ``--device cpu``; else
    ``gpus_per_task`` where given (a fraction lets several tasks share a GPU), else 1 for a
    method bound by its linear algebra (``Method.gpu_bound``: its tasks then run on GPU nodes)
    and none for the others, whose merges are bound by reading."""
    if ctx.device_name == "cpu" or ray.cluster_resources().get("GPU", 0) <= 0:
        return 0
    if gpus_per_task is not None:
        return gpus_per_task
    return 1 if ctx.method.gpu_bound else 0


def _task_error(ray: Any, exc: Exception, what: str) -> Exception:
    """The merge's own error when the task raised one; else what Ray reports (a worker that
    died on every run), as one line naming the part."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        if isinstance(exc.cause, AmalgamError):
            return exc.cause
        return exc
    return MergeError(
        f"{what}: its Ray worker was lost {UNIT_RETRIES + 1} times ({type(exc).__name__})"
    )
