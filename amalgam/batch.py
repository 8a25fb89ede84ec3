"""batch: many recipes run side by side as Ray tasks on one Ray cluster, one summary.

Each recipe is one Ray task that runs the whole pipeline of that recipe
(:func:`amalgam.pipeline.run_pipeline`: fetch, align, merge, and compress, evaluate, register
when the recipe has their sections), with the skip rules of its stages: a recipe whose output
already holds its merge is reported ``skipped``. At most ``concurrency`` recipes are in flight.
A worker that dies has its recipe run again by Ray (``max_retries``); a storage or network
failure (:func:`amalgam.transient.is_transient`) is retried inside the task; a recipe's own
error (it does not parse, an input is missing, the merge refuses) fails that recipe at once,
and the others go on. The driver holds only the small :class:`ItemResult` records.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from amalgam import storage
from amalgam.engine.ray_executor import alive_nodes, ensure_ray
from amalgam.errors import AmalgamError
from amalgam.pipeline import default_output, run_pipeline
from amalgam.recipe import Recipe, load_recipe, redact_uri
from amalgam.registry import Registry
from amalgam.stages import Runner, Stage, StageReport, execute
from amalgam.stages.merge import Merged
from amalgam.transient import RETRY_DELAYS, is_transient
from amalgam.writer import read_record

log = logging.getLogger(__name__)

Status = Literal["ok", "failed", "skipped"]

#: The summary table's columns, in order.
COLUMNS = (
    "recipe",
    "status",
    "output",
    "content_hash",
    "seconds",
    "bytes_read",
    "bytes_written",
    "error",
)


@dataclass
class ItemResult:
    """One recipe's outcome: what the driver keeps (never tensors or a model)."""

    recipe: str  # the recipe file, as given
    status: Status
    output: str = ""
    content_hash: str = ""
    seconds: float = 0.0  # wall time of the recipe's pipeline, retries included
    bytes_read: int = 0  # input bytes the merge read (0 when skipped)
    bytes_written: int = 0  # bytes of the merge's committed files (0 when skipped)
    error: str = ""  # one line: why it failed
    started: float = 0.0  # epoch seconds, on the worker
    ended: float = 0.0
    host: str = ""  # the node that ran it
    attempts: int = 0  # runs of the pipeline in its last worker (transient retries)
    parents: dict[str, tuple[str, str]] = field(default_factory=dict)  # label -> (URI, hash)
    registered: dict | None = None

    def row(self) -> dict[str, Any]:
        """The summary table's row."""
        return {k: getattr(self, k) for k in COLUMNS}


@dataclass
class BatchResult:
    """Every recipe's result, in the order given, and the batch's MLflow run."""

    items: list[ItemResult]
    seconds: float
    mlflow_run_id: str | None = None

    def count(self, status: Status) -> int:
        return sum(r.status == status for r in self.items)

    @property
    def exit_code(self) -> int:
        """0 when every recipe succeeded (merged or skipped), 1 when any failed."""
        return 1 if self.count("failed") else 0

    def totals(self) -> dict[str, float]:
        return {
            "ok": self.count("ok"),
            "failed": self.count("failed"),
            "skipped": self.count("skipped"),
            "seconds": self.seconds,
            "bytes_read": sum(r.bytes_read for r in self.items),
            "bytes_written": sum(r.bytes_written for r in self.items),
        }

    def rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.items]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def report(self) -> StageReport:
        totals = self.totals()
        summary = ", ".join(f"{totals[k]:.0f} {k}" for k in ("ok", "skipped", "failed"))
        return StageReport(
            tables={"batch": self.rows()},
            description=f"{len(self.items)} recipes: {summary} in {self.seconds:.1f} s",
        )


def error_line(exc: BaseException) -> str:
    """``exc`` as one line, passwords in URIs redacted: amalgam's own errors as they read
    (they name their file or field), others with their type."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, AmalgamError | OSError) or not text:
        text = f"{type(exc).__name__}: {text}".rstrip(": ")
    return redact_uri(text) or type(exc).__name__


def run_recipe_item(source: str, recipe: Recipe, retries: int) -> ItemResult:
    """Run one recipe's pipeline (the body of its Ray task): transient failures are retried
    ``retries`` times, after :data:`RETRY_DELAYS`; any other error fails it at once."""
    started = time.time()
    host = socket.gethostname()
    attempts = 0
    while True:
        attempts += 1
        merged: list[Merged] = []
        try:
            result = run_pipeline(recipe, runner=_keeping_merge(merged))
            break
        except Exception as exc:
            if attempts <= retries and is_transient(exc):
                delay = RETRY_DELAYS[min(attempts, len(RETRY_DELAYS)) - 1]
                log.warning("%s: %s; retrying in %d s", source, error_line(exc), delay)
                time.sleep(delay)
                continue
            ended = time.time()
            return ItemResult(
                source,
                "failed",
                error=error_line(exc),
                seconds=ended - started,
                started=started,
                ended=ended,
                host=host,
                attempts=attempts,
            )
    done = merged[-1]
    ended = time.time()
    return ItemResult(
        source,
        "skipped" if done.skipped else "ok",
        output=result.output,
        content_hash=result.content_hash,
        seconds=ended - started,
        bytes_read=done.bytes_read,
        bytes_written=0 if done.skipped else _committed_bytes(done.output, recipe),
        started=started,
        ended=ended,
        host=host,
        attempts=attempts,
        parents={m["label"]: (m["uri"], m["content_hash"]) for m in result.inputs},
        registered=result.registered,
    )


def _keeping_merge(kept: list[Merged]) -> Runner:
    """A runner that runs each stage with :func:`execute` and keeps the merge's output."""

    def runner(stage: Stage, inp: Any) -> Any:
        out = execute(stage, inp)
        if isinstance(out, Merged):
            kept.append(out)
        return out

    return runner


def _committed_bytes(output: str, recipe: Recipe) -> int:
    fs, path = storage.resolve(output, **recipe.storage_options)
    record = read_record(fs, path) or {"files": {}}
    return sum(entry["bytes"] for entry in record["files"].values())


def connect(address: str | None) -> int:
    """Connect to the Ray cluster at ``address`` (``ray://host:10001``, ``auto``, a GCS
    address), else ``RAY_ADDRESS``, else a local Ray (:func:`ensure_ray`); returns its number
    of live nodes. The address is put in ``RAY_ADDRESS``, where :func:`ensure_ray` and the
    engine's Ray executor look."""
    if address:
        os.environ["RAY_ADDRESS"] = address
    ensure_ray(storage.amalgam_home())
    # lazy: Ray takes seconds to import and only a batch needs it here
    import ray

    return alive_nodes(ray)


def local_output_error(recipe: Recipe, nodes: int) -> str:
    """Why ``recipe`` cannot run on a cluster of ``nodes`` nodes ("" when it can): with more
    than one, an output on a local path (its ``output``, or the default under
    ``$AMALGAM_HOME``) would land on whichever node ran it, out of the others' reach."""
    output = recipe.output or default_output(recipe)
    if nodes < 2 or not storage.local_uris([output], **recipe.storage_options):
        return ""
    return (
        f"output: {output} is a local path, and the Ray cluster has {nodes} nodes: "
        "give an output on storage every node reaches (s3://...)"
    )


def read_recipes(paths: Sequence[str | Path]) -> tuple[list[Recipe | None], list[str]]:
    """Each file's recipe, or None with the reason (a file that does not parse is a failed
    recipe of the batch, not an error of the batch)."""
    recipes: list[Recipe | None] = []
    errors: list[str] = []
    for path in paths:
        try:
            recipes.append(load_recipe(path))
            errors.append("")
        except AmalgamError as exc:
            recipes.append(None)
            errors.append(error_line(exc))
    return recipes, errors


def run_batch(
    paths: Sequence[str | Path],
    *,
    address: str | None = None,
    concurrency: int = 4,
    retries: int = 2,
    gpus: float = 0,
    experiment: str | None = "amalgam-batch",
    tracking_uri: str | None = None,
) -> BatchResult:
    """Run every recipe file in ``paths`` as a Ray task (see the module's docstring); at most
    ``concurrency`` at a time, each with ``gpus`` GPUs (fractional: several recipes share
    one), which its merge and evaluation then use. The summary goes to MLflow
    (``experiment`` in the store at ``tracking_uri``; None: not logged): one run for the
    batch, a nested run per recipe."""
    if concurrency < 1:
        raise AmalgamError(f"concurrency: {concurrency} is not a positive number of recipes")
    if retries < 0:
        raise AmalgamError(f"retries: {retries} is negative")
    if gpus < 0:
        raise AmalgamError(f"gpus: {gpus} is negative")
    start = time.perf_counter()
    sources = [str(p) for p in paths]
    recipes, errors = read_recipes(paths)
    results: list[ItemResult | None] = [
        None if r is not None else ItemResult(s, "failed", error=e)
        for s, r, e in zip(sources, recipes, errors, strict=True)
    ]
    if any(r is not None for r in recipes):
        nodes = connect(address)
        _check_gpus(gpus)
        for i, recipe in enumerate(recipes):
            if recipe is not None and (refused := local_output_error(recipe, nodes)):
                results[i] = ItemResult(sources[i], "failed", error=refused)
        jobs = [(i, sources[i], r) for i, r in enumerate(recipes) if results[i] is None]
        for i, item in _run_on_ray(jobs, concurrency, retries, gpus):
            results[i] = item
            log.info("%s: %s %s", item.recipe, item.status, item.error or item.output)
    batch = BatchResult([r for r in results if r is not None], time.perf_counter() - start)
    if experiment is not None:
        registry = Registry(tracking_uri)
        batch.mlflow_run_id = registry.log_batch(
            experiment,
            batch.rows(),
            totals=batch.totals(),
            items=[asdict(r) for r in batch.items],
            recipes=recipes,
        )
    return batch


def _check_gpus(gpus: float) -> None:
    """A request for GPUs that no node has would wait forever: refuse it."""
    # lazy: Ray takes seconds to import and only a batch needs it here
    import ray

    found = ray.cluster_resources().get("GPU", 0)
    if gpus > 0 and found == 0:
        raise AmalgamError(f"gpus: {gpus} per recipe asked, and the Ray cluster has no GPU")
    if gpus > 1 and not any(
        node["Resources"].get("GPU", 0) >= gpus for node in ray.nodes() if node["Alive"]
    ):
        raise AmalgamError(f"gpus: {gpus} per recipe asked, and no Ray node has that many")


def _run_on_ray(
    jobs: list[tuple[int, str, Recipe]], concurrency: int, retries: int, gpus: float
) -> Iterator[tuple[int, ItemResult]]:
    """Yield (index, result) as the recipes of ``jobs`` (index, file, recipe) finish, never
    more than ``concurrency`` of them submitted at once."""
    # lazy: Ray takes seconds to import and only a batch needs it here
    import ray

    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=retries)(run_recipe_item)
    waiting = list(jobs)
    pending: dict[Any, tuple[int, str]] = {}
    while waiting or pending:
        while waiting and len(pending) < concurrency:
            i, source, recipe = waiting.pop(0)
            pending[task.remote(source, recipe, retries)] = (i, source)
        done, _ = ray.wait(list(pending), num_returns=1)
        i, source = pending.pop(done[0])
        try:
            item = ray.get(done[0])
        except ray.exceptions.RayError as exc:
            item = ItemResult(source, "failed", error=_ray_error(exc, retries))
        yield i, item


def _ray_error(exc: Exception, retries: int) -> str:
    """What Ray reports when a recipe's task could not finish: its worker lost on every run
    (killed, out of memory, its node gone), or the task not run at all."""
    # lazy: Ray takes seconds to import and only a batch needs it here
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        return error_line(exc.cause if isinstance(exc.cause, BaseException) else exc)
    lost = ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError
    if isinstance(exc, lost | ray.exceptions.ObjectLostError):
        return f"its Ray worker was lost {retries + 1} times ({type(exc).__name__})"
    return error_line(exc)
