"""TALL-mask storage: several experts of one base kept as one multi-task vector and one bit mask
per task (Wang et al., "Localizing Task Information for Improved Model Merging and
Compression", arXiv 2405.07813).

With task vectors tau_t = theta_t - theta_0, the multi-task vector is their sum (task
arithmetic without scaling, the vector the paper builds its masks against) and task t's mask is
m_t = [|tau_t| > lambda_t * |tau_MTL - tau_t|]; expert t is rebuilt as theta_0 + m_t * tau_MTL.
The paper writes the comparison as >=, the authors' code and :func:`tall_mask` (shared with the
Consensus merges) as >: they differ only where both sides are exactly equal.

A TALL folder is ``compression.json`` (method ``tall``, the base's and every task's content
hash, each task's lambda, per tensor its shape, dtype, encoding and file), the shards
``compressed-NNNNN.safetensors`` and the first task's config and tokenizer files. Each float
tensor ``name`` is stored as ``name`` (tau_MTL in the tensor's dtype) followed by
``name:mask:<i>`` for task i in manifest order (U8, ceil(numel/8) bytes, bits packed as
:func:`amalgam.compress.codec.pack_bits`); other tensors (integer buffers) must equal the
base's and are rebuilt from it (encoding ``base``). Every size is known from the shapes before
any data is read, so shards are planned up front and written tensor by tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any

import torch

import amalgam.compress.codec as codec
from amalgam import __version__, storage
from amalgam.align.compatibility import check_compatibility
from amalgam.checkpoint import SAFETENSORS_DTYPES, Checkpoint, open_checkpoint
from amalgam.compress.errors import CompressError
from amalgam.compress.folder import (
    FORMAT,
    MANIFEST,
    CompressResult,
    TensorReport,
    copy_side_files,
    write_rebuilt,
)
from amalgam.engine.inputs import check_output
from amalgam.engine.plan import TensorJob, shard_groups, shard_jobs
from amalgam.methods.consensus import tall_mask
from amalgam.recipe import CompressSpec
from amalgam.writer import CheckpointWriter, ShardWriter

PAPER = "arXiv:2405.07813"
MASK = ":mask:"
Entry = tuple[str, str, tuple[int, ...]]


def mask_name(name: str, index: int) -> str:
    """The stored name of task ``index``'s mask of tensor ``name``."""
    return f"{name}{MASK}{index}"


def task_lambdas(spec: CompressSpec, tasks: list[str]) -> dict[str, float]:
    """Each task's mask threshold; a per-task table must name exactly the tasks."""
    if not isinstance(spec.tall_lambda, dict):
        return dict.fromkeys(tasks, spec.tall_lambda)
    given = set(spec.tall_lambda)
    if given != set(tasks):
        raise CompressError(
            f"tall_lambda: names tasks {sorted(given)}, the experts are {sorted(tasks)}"
        )
    return {t: spec.tall_lambda[t] for t in tasks}


def _entries(name: str, dtype: str, shape: tuple[int, ...], tasks: int) -> list[Entry]:
    masks = [(mask_name(name, i), "U8", ((math.prod(shape) + 7) // 8,)) for i in range(tasks)]
    return [(name, dtype, shape), *masks]


def compress_tall(
    experts: Mapping[str, str],
    base_uri: str,
    output_uri: str,
    spec: CompressSpec | None = None,
    *,
    overwrite: bool = False,
    **storage_options: Any,
) -> CompressResult:
    """Store ``experts`` (task name -> fine-tune of ``base_uri``) as TALL masks and one
    multi-task vector in ``output_uri``; ``dense_bytes`` of the result are the experts' weights
    together.

    Streams tensor by tensor: for each, the base's tensor, the running sum and one expert's
    tensor and task vector are held (each expert's tensor is read twice: for the sum, then for
    its mask). Nothing is left at ``output_uri`` on failure.
    """
    spec = spec or CompressSpec(method="tall")
    tasks = list(experts)
    if len(tasks) < 1:
        raise CompressError("tall: give at least one expert")
    lambdas = task_lambdas(spec, tasks)
    with ExitStack() as stack:
        base = stack.enter_context(open_checkpoint(base_uri, **storage_options))
        models = {
            t: stack.enter_context(open_checkpoint(uri, **storage_options))
            for t, uri in experts.items()
        }
        _check_inputs(base, models)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "method": "tall",
            "paper": PAPER,
            "kind": "model",
            "settings": spec.settings(),
            "base": {"uri": base.uri, "hash": base.content_hash()},
            "tasks": {
                t: {"uri": m.uri, "hash": m.content_hash(), "lambda": lambdas[t]}
                for t, m in models.items()
            },
            "amalgam": __version__,
            "tensors": {},
        }
        inputs = {"base": base} | {f"expert {t}": m for t, m in models.items()}
        check_output(output_uri, inputs, overwrite, storage_options)
        writer = CheckpointWriter(
            output_uri, overwrite=overwrite, sources=inputs.values(), **storage_options
        )
        try:
            files, reports = _write(base, models, lambdas, writer, spec.max_shard_size, manifest)
            raw = json.dumps(manifest, separators=(",", ":")).encode()
            with writer.fs.open(storage.join(writer.staging, MANIFEST), "wb") as fh:
                fh.write(raw)
            files[MANIFEST] = len(raw)
            side = copy_side_files(models[tasks[0]], writer)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    return CompressResult(
        output=storage.full_uri(writer.fs, writer.path),
        compressed_bytes=sum(files.values()),
        dense_bytes=sum(m.nbytes for m in models.values()),
        side_bytes=side,
        files=files,
        tensors=reports,
    )


def _check_inputs(base: Checkpoint, models: dict[str, Checkpoint]) -> None:
    if base.kind == "adapter" or any(m.kind == "adapter" for m in models.values()):
        raise CompressError("tall: base and experts must be dense models, not adapter folders")
    fit = check_compatibility({"base": base} | models, vocabulary=False, raise_on_error=False)
    if not fit.ok:
        raise CompressError(f"tall: the experts do not fit the base {base.uri}\n{fit.describe()}")


def _write(
    base: Checkpoint,
    models: dict[str, Checkpoint],
    lambdas: dict[str, float],
    writer: CheckpointWriter,
    max_shard_size: int,
    manifest: dict[str, Any],
) -> tuple[dict[str, int], list[TensorReport]]:
    """Plan the shards from the shapes, then write each tensor's vector and masks in order."""
    float_names = []
    for name, info in base.tensors.items():  # in the base's order, rebuilt in the same
        entry = {"shape": list(info.shape), "dtype": info.dtype, "encoding": "tall"}
        if info.is_float:
            float_names.append(name)
        else:
            _check_buffer(name, base, models)
            entry["encoding"] = "base"
        manifest["tensors"][name] = entry
    items = [
        (n, _entries(n, base.info(n).dtype, base.info(n).shape, len(models))) for n in float_names
    ]
    groups = shard_groups(items, lambda item: codec.payload_bytes(item[1]), max_shard_size)
    files: dict[str, int] = {}
    reports = []
    for number, (_, group) in enumerate(groups, start=1):
        file = f"compressed-{number:05d}.safetensors"
        entries = [e for _, es in group for e in es]
        shard = writer.shard(file, entries, {"format": "amalgam-tall"})
        try:
            for name, tensor_entries in group:
                kept = _write_tensor(name, base, models, lambdas, shard)
                info = base.info(name)
                manifest["tensors"][name] |= {"kept": kept, "file": file}
                stored = codec.payload_bytes(tensor_entries)
                dense = info.nbytes * len(models)
                bits = info.numel * len(models)  # one mask bit per entry and task
                reports.append(TensorReport(name, "tall", bits, sum(kept), dense, stored))
        except BaseException:
            shard.discard()
            raise
        shard.close()
        files[file] = shard.nbytes
    return files, reports


def _check_buffer(name: str, base: Checkpoint, models: dict[str, Checkpoint]) -> None:
    """A non-float tensor is rebuilt from the base: every expert must hold the same one."""
    reference = base.tensor(name)
    for task, model in models.items():
        if not torch.equal(model.tensor(name), reference):
            raise CompressError(
                f"tensor '{name}': expert {task} ({model.uri}) differs from the base; TALL "
                "stores non-float tensors as the base's"
            )


def _task_vector(name: str, model: Checkpoint, theta0: torch.Tensor) -> torch.Tensor:
    return model.tensor(name).to(torch.float32).sub_(theta0)  # a fresh tensor: in place


def _check_finite(
    name: str,
    total: torch.Tensor,
    theta0: torch.Tensor,
    base: Checkpoint,
    models: dict[str, Checkpoint],
) -> None:
    """A NaN or Inf in any input makes the sum non-finite: checked once, on the sum (the
    check's temporaries are the size of the tensor); the culprit is looked for only then."""
    if bool(torch.isfinite(total).all()):
        return
    for model in models.values():
        if not bool(torch.isfinite(_task_vector(name, model, theta0)).all()):
            raise CompressError(
                f"tensor '{name}': NaN or Inf in {model.uri} or its base {base.uri}"
            )
    raise CompressError(f"tensor '{name}': the sum of the task vectors overflows float32")


def _write_tensor(
    name: str,
    base: Checkpoint,
    models: dict[str, Checkpoint],
    lambdas: dict[str, float],
    shard: ShardWriter,
) -> list[int]:
    """Write tau_MTL and each task's packed mask of ``name``; the set bits per task."""
    theta0 = base.tensor(name).to(torch.float32)
    total = torch.zeros_like(theta0)
    for model in models.values():
        total.add_(_task_vector(name, model, theta0))
    _check_finite(name, total, theta0, base, models)
    shard.write(name, total.to(SAFETENSORS_DTYPES[base.info(name).dtype]))
    kept = []
    for i, (task, model) in enumerate(models.items()):
        mask = tall_mask(_task_vector(name, model, theta0), total, lambdas[task])
        shard.write(mask_name(name, i), codec.pack_bits(mask.reshape(-1)))
        kept.append(int(mask.sum()))
    return kept


def decompress_task(
    compressed_uri: str,
    manifest: dict[str, Any],
    task: str | None,
    base_uri: str | None,
    output_uri: str,
    *,
    overwrite: bool = False,
    max_shard_size: int = 5 * 10**9,
    **storage_options: Any,
) -> str:
    """Rebuild expert ``task`` of a TALL folder as a dense model folder, tensor by tensor.

    ``base_uri`` defaults to the base recorded at compression; its content hash must match.
    """
    tasks = list(manifest["tasks"])
    if task not in manifest["tasks"]:
        what = "name one with --task" if task is None else f"unknown task {task!r}"
        raise CompressError(f"{compressed_uri}: {what}; the stored tasks are {', '.join(tasks)}")
    index = tasks.index(task)
    recorded = manifest["base"]
    tensors: dict[str, dict[str, Any]] = manifest["tensors"]
    jobs = [
        TensorJob(name, tuple(t["shape"]), t["dtype"], copy=True, layer=None)
        for name, t in tensors.items()
    ]
    with ExitStack() as stack:
        packed = stack.enter_context(open_checkpoint(compressed_uri, **storage_options))
        base = stack.enter_context(open_checkpoint(base_uri or recorded["uri"], **storage_options))
        if base.content_hash() != recorded["hash"]:
            raise CompressError(
                f"{base.uri}: content hash {base.content_hash()} is not the base these masks "
                f"were built against ({recorded['uri']}, {recorded['hash']})"
            )
        metadata = {"amalgam.decompressed_from": manifest["tasks"][task]["hash"]}
        check_output(output_uri, {"compressed": packed, "base": base}, overwrite, storage_options)
        return write_rebuilt(
            output_uri,
            shard_jobs(jobs, max_shard_size),
            lambda name: _dense(name, tensors[name], packed, base, index),
            metadata,
            packed,
            sources=[packed, base],
            overwrite=overwrite,
            **storage_options,
        )


def _dense(
    name: str, entry: dict[str, Any], packed: Checkpoint, base: Checkpoint, index: int
) -> torch.Tensor:
    """theta_0 + m * tau_MTL in float32, in the tensor's dtype: the base's entry, bit for bit,
    where the mask is clear. Holds the base's tensor, the sum and the mask."""
    if entry["encoding"] == "base":
        return base.tensor(name)
    theta0 = base.tensor(name).to(torch.float32)
    summed = packed.tensor(name).to(torch.float32).add_(theta0)  # a fresh tensor: in place
    mask = codec.unpack_bits(packed.tensor(mask_name(name, index)), theta0.numel())
    out = torch.where(mask.reshape(theta0.shape), summed, theta0)
    return out.to(SAFETENSORS_DTYPES[entry["dtype"]])
