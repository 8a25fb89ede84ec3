"""Ray executor: one task per shard; each worker reads its inputs and writes its shard itself.

A worker that dies (killed, out of memory, its node lost) has its task run again by Ray, up to
:data:`UNIT_RETRIES` times: the shard is written again from its start (opening it for writing
truncates what the dead worker wrote), and the commit record hashes the shards as they end
up. An error raised by the merge itself is not retried."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from amalgam import storage
from amalgam.device import pick_device
from amalgam.engine.execute import JobContext, open_inputs, open_statistics, run_unit
from amalgam.errors import AmalgamError, MergeError
from amalgam.writer import ShardWriter

UNIT_RETRIES = 3  # runs of a shard's task after the first, when its worker dies

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


def _unit_task(ctx: JobContext, index: int, staging_uri: str) -> int:
    ctx = replace(ctx, device=pick_device(ctx.device_name))
    plan = ctx.plan
    unit = plan.units[index]
    storage_options = plan.recipe.storage_options
    sources = open_inputs(plan, ctx.allow_pickle, storage_options)
    statistics = open_statistics(plan, storage_options)
    fs, folder = storage.resolve(staging_uri, **storage_options)
    shard = ShardWriter(fs, storage.join(folder, unit.file), unit.entries(), plan.metadata)
    try:
        return run_unit(ctx, unit, sources, shard, statistics)
    finally:
        for s in sources + statistics:
            s.close()


def run_units_ray(ctx: JobContext, staging_uri: str) -> int:
    """Run every shard of ``ctx.plan`` as a Ray task writing into ``staging_uri``; returns the
    input bytes read."""
    ensure_ray(storage.amalgam_home())
    # lazy: Ray takes seconds to import and only this executor needs it
    import ray

    gpus = 1 if ctx.device_name in ("cuda", "auto") and _cluster_has_gpu(ray) else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=UNIT_RETRIES)(_unit_task)
    shipped = replace(ctx, progress=None)
    pending = {task.remote(shipped, i, staging_uri): i for i in range(len(ctx.plan.units))}
    total = 0
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        try:
            n = ray.get(done[0])
        except ray.exceptions.RayError as exc:
            for ref in pending:
                ray.cancel(ref)
            raise _unit_error(ray, exc, ctx.plan.units[i].file) from None
        total += n
        ctx.report(n, len(ctx.plan.units[i].jobs))
    return total


def _cluster_has_gpu(ray: Any) -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def _unit_error(ray: Any, exc: Exception, file: str) -> Exception:
    """The merge's own error when the task raised one; else what Ray reports (a worker that
    died on every run), as one line naming the shard."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        if isinstance(exc.cause, AmalgamError):
            return exc.cause
        return exc
    return MergeError(
        f"{file}: its Ray worker was lost {UNIT_RETRIES + 1} times ({type(exc).__name__})"
    )
