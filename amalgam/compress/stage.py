"""Compress a fine-tuned model against its base, tensor by tensor, and decompress it back.

A compressed model is a folder: ``compression.json`` (method, settings, base and model hashes,
and per tensor its shape, dtype, encoding, kept count and file), the compressed shards
``compressed-NNNNN.safetensors`` (see :mod:`amalgam.compress.codec`) and the model's config
and tokenizer files, so that :func:`decompress_model` can rebuild a loadable model folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

import amalgam.compress.codec as codec
from amalgam import __version__, storage
from amalgam.align.compatibility import check_compatibility
from amalgam.checkpoint import SAFETENSORS_DTYPES, Checkpoint, open_checkpoint
from amalgam.compress.compeft import compeft
from amalgam.engine.inputs import check_output
from amalgam.engine.plan import TensorJob, shard_jobs
from amalgam.errors import AmalgamError
from amalgam.recipe import CompressSpec
from amalgam.writer import INDEX_NAME, CheckpointWriter, shard_header

MANIFEST = "compression.json"
FORMAT = 1
PAPER = "arXiv:2311.13171"


class CompressError(AmalgamError):
    """A model cannot be compressed or decompressed (base mismatch, bad manifest, ...)."""


@dataclass(frozen=True)
class TensorReport:
    """One tensor's outcome: how it is stored, entries kept, and bytes before and after."""

    name: str
    encoding: str  # bitmask | indices | dense
    numel: int
    kept: int
    dense_bytes: int
    stored_bytes: int


@dataclass
class CompressResult:
    """Where the compressed model went and its exact size: ``compressed_bytes`` is the byte
    count of the files that hold the weights (shards, headers included, and the manifest);
    config and tokenizer files copied alongside are counted apart in ``side_bytes``."""

    output: str
    compressed_bytes: int
    dense_bytes: int
    side_bytes: int
    files: dict[str, int]
    tensors: list[TensorReport] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.compressed_bytes

    def summary(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "compressed_bytes": self.compressed_bytes,
            "dense_bytes": self.dense_bytes,
            "ratio": self.ratio,
            "side_bytes": self.side_bytes,
            "kept": sum(t.kept for t in self.tensors),
            "parameters": sum(t.numel for t in self.tensors),
        }


class _ShardSpool:
    """Compressed tensors held until a shard's worth is ready, then written in one file."""

    def __init__(self, writer: CheckpointWriter, max_bytes: int, metadata: dict[str, str]):
        self.writer, self.max_bytes, self.metadata = writer, max_bytes, metadata
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.files: dict[str, int] = {}

    @property
    def current(self) -> str:
        return f"compressed-{len(self.files) + 1:05d}.safetensors"

    def add(self, stored: list[tuple[str, torch.Tensor]]) -> str:
        size = codec.payload_bytes(codec.entries_of(self.pending + stored))
        if self.pending and size > self.max_bytes:
            self.flush()
        self.pending += stored
        return self.current

    def flush(self) -> None:
        if not self.pending:
            return
        entries = codec.entries_of(self.pending)
        shard = self.writer.shard(self.current, entries, self.metadata)
        written = len(shard_header(entries, self.metadata))
        try:
            for name, t in self.pending:
                written += shard.write(name, t)
        except BaseException:
            shard.discard()
            raise
        shard.close()
        self.files[self.current] = written
        self.pending = []


def compress_model(
    model_uri: str,
    base_uri: str,
    output_uri: str,
    spec: CompressSpec | None = None,
    *,
    overwrite: bool = False,
    **storage_options: Any,
) -> CompressResult:
    """Compress ``model_uri`` (a fine-tune of ``base_uri``) with ComPEFT into ``output_uri``.

    ``spec`` is a :class:`amalgam.recipe.CompressSpec` (default settings when None). Reads one
    tensor pair at a time; nothing is left at ``output_uri`` on failure.
    """
    spec = spec or CompressSpec()
    keep_dense = re.compile(spec.keep_dense) if spec.keep_dense else None
    with (
        open_checkpoint(model_uri, **storage_options) as model,
        open_checkpoint(base_uri, **storage_options) as base,
    ):
        fit = check_compatibility(
            {"base": base, "model": model}, vocabulary=False, raise_on_error=False
        )
        if not fit.ok:
            raise CompressError(
                f"{model_uri}: cannot compress against {base_uri}\n{fit.describe()}"
            )
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "method": spec.method,
            "paper": PAPER,
            "settings": spec.model_dump(mode="json", exclude={"output", "max_shard_size"}),
            "base": {"uri": base.uri, "hash": base.content_hash()},
            "model": {"uri": model.uri, "hash": model.content_hash()},
            "amalgam": __version__,
            "tensors": {},
        }
        check_output(output_uri, {"model": model, "base": base}, overwrite, storage_options)
        writer = CheckpointWriter(output_uri, overwrite=overwrite, **storage_options)
        try:
            result = _compress(model, base, writer, spec, keep_dense, manifest)
            result.side_bytes = _copy_side_files(model, writer)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    return result


def _compress(
    model: Checkpoint,
    base: Checkpoint,
    writer: CheckpointWriter,
    spec: CompressSpec,
    keep_dense: re.Pattern | None,
    manifest: dict[str, Any],
) -> CompressResult:
    spool = _ShardSpool(writer, spec.max_shard_size, {"format": "amalgam-compeft"})
    reports = []
    for name, info in model.tensors.items():
        weights = model.tensor(name)
        if not info.is_float or (keep_dense and keep_dense.search(name)):
            stored, kind, kept = [(name, weights)], "dense", info.numel
        else:
            tau = weights.to(torch.float32) - base.tensor(name).to(torch.float32)
            if not bool(torch.isfinite(tau).all()):
                raise CompressError(
                    f"tensor '{name}': NaN or Inf in {model.uri} or its base {base.uri}"
                )
            ternary = compeft(tau, spec.density, spec.scale, spec.alpha)
            stored, kept = codec.encode(name, ternary), ternary.positions.numel()
            kind = codec.encoding(info.numel, kept)
        file = spool.add(stored)
        manifest["tensors"][name] = {
            "shape": list(info.shape),
            "dtype": info.dtype,
            "encoding": kind,
            "kept": kept,
            "file": file,
        }
        reports.append(
            TensorReport(
                name,
                kind,
                info.numel,
                kept,
                info.nbytes,
                codec.payload_bytes(codec.entries_of(stored)),
            )
        )
    spool.flush()
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    with writer.fs.open(storage.join(writer.staging, MANIFEST), "wb") as fh:
        fh.write(raw)
    files = {**spool.files, MANIFEST: len(raw)}
    return CompressResult(
        output=storage.full_uri(writer.fs, writer.path),
        compressed_bytes=sum(files.values()),
        dense_bytes=model.nbytes,
        side_bytes=0,
        files=files,
        tensors=reports,
    )


def _copy_side_files(src: Checkpoint, writer: CheckpointWriter) -> int:
    size = 0
    for name in src.side_files():
        path = storage.join(src.root, name)
        writer.copy_in(src.fs, path, name)
        size += src.fs.size(path)
    return size


def read_manifest(compressed_uri: str, **storage_options: Any) -> dict[str, Any]:
    """The ``compression.json`` of a compressed model folder, checked for its format."""
    fs, path = storage.resolve(compressed_uri, **storage_options)
    file = storage.join(path, MANIFEST)
    if not fs.exists(file):
        raise CompressError(f"{compressed_uri}: no {MANIFEST}, so not a compressed model")
    try:
        with fs.open(file, "rb") as fh:
            manifest = json.loads(fh.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompressError(f"{compressed_uri}/{MANIFEST}: unreadable ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("method") != "compeft":
        raise CompressError(
            f"{compressed_uri}/{MANIFEST}: format {manifest.get('format')!r} method "
            f"{manifest.get('method')!r} is not amalgam's compeft format {FORMAT}"
        )
    return manifest


def decompress_model(
    compressed_uri: str,
    base_uri: str | None,
    output_uri: str,
    *,
    overwrite: bool = False,
    max_shard_size: int = 5 * 10**9,
    **storage_options: Any,
) -> str:
    """Rebuild a dense Hugging Face model folder: base + scale * sign at the kept positions.

    ``base_uri`` defaults to the base recorded at compression; its content hash must match the
    recorded one. Returns the output URI.
    """
    manifest = read_manifest(compressed_uri, **storage_options)
    base_uri = base_uri or manifest["base"]["uri"]
    tensors: dict[str, dict[str, Any]] = manifest["tensors"]
    jobs = [
        TensorJob(name, tuple(t["shape"]), t["dtype"], copy=True, layer=None)
        for name, t in tensors.items()
    ]
    units = shard_jobs(jobs, max_shard_size)
    with (
        open_checkpoint(compressed_uri, **storage_options) as packed,
        open_checkpoint(base_uri, **storage_options) as base,
    ):
        if base.content_hash() != manifest["base"]["hash"]:
            raise CompressError(
                f"{base_uri}: content hash {base.content_hash()} is not the base this model was "
                f"compressed against ({manifest['base']['uri']}, {manifest['base']['hash']})"
            )
        metadata = {"amalgam.decompressed_from": manifest["model"]["hash"]}
        check_output(output_uri, {"compressed": packed, "base": base}, overwrite, storage_options)
        writer = CheckpointWriter(output_uri, overwrite=overwrite, **storage_options)
        try:
            for unit in units:
                shard = writer.shard(unit.file, unit.entries(), metadata)
                try:
                    for job in unit.jobs:
                        shard.write(job.name, _dense(job.name, tensors[job.name], packed, base))
                except BaseException:
                    shard.discard()
                    raise
                shard.close()
            if len(units) > 1:
                weight_map = {j.name: u.file for u in units for j in u.jobs}
                total = sum(u.nbytes for u in units)
                writer.write_json(
                    INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map}
                )
            _copy_side_files(packed, writer)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    return storage.full_uri(writer.fs, writer.path)


def _dense(name: str, entry: dict[str, Any], packed: Checkpoint, base: Checkpoint) -> torch.Tensor:
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    if entry["encoding"] == "dense":
        return packed.tensor(name)
    ternary = codec.decode(
        tuple(entry["shape"]),
        entry["kept"],
        packed.tensor(name + codec.POSITIONS),
        packed.tensor(name + codec.SIGNS),
        float(packed.tensor(name + codec.SCALE)),
    )
    return (base.tensor(name).to(torch.float32) + ternary.delta()).to(dtype)
