"""Compress a fine-tuned model against its base, tensor by tensor, and decompress it back.

A compressed model is a folder: ``compression.json`` (method, settings, ``kind`` (``model`` or
``adapter``), base and model hashes, and per tensor its shape, dtype, encoding, kept count,
file and ``base_tensor``, the base tensor its task vector was taken against, null for zero),
the compressed shards ``compressed-NNNNN.safetensors`` (see :mod:`amalgam.compress.codec`) and
the model's config and tokenizer files (or ``adapter_config.json``), so that
:func:`decompress_model` can rebuild a loadable model or adapter folder. A PEFT adapter's
tensors are compressed as :mod:`amalgam.compress.adapter` says; its base is optional.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from typing import Any

import torch

import amalgam.compress.codec as codec
import amalgam.compress.losparse as losparse
from amalgam import __version__, storage
from amalgam.adapters.peft_write import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from amalgam.align.compatibility import check_compatibility
from amalgam.checkpoint import SAFETENSORS_DTYPES, Checkpoint, open_checkpoint
from amalgam.compress.adapter import references
from amalgam.compress.compeft import compeft
from amalgam.compress.errors import CompressError
from amalgam.compress.folder import (
    FORMAT,
    MANIFEST,
    METHODS,
    CompressResult,
    TensorReport,
    copy_side_files,
    write_rebuilt,
)
from amalgam.compress.tall import decompress_task
from amalgam.engine.inputs import check_output
from amalgam.engine.plan import TensorJob, WorkUnit, shard_jobs
from amalgam.recipe import CompressSpec
from amalgam.writer import CheckpointWriter, shard_header

PAPER = "arXiv:2311.13171"


class ShardSpool:
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
    base_uri: str | None,
    output_uri: str,
    spec: CompressSpec | None = None,
    *,
    overwrite: bool = False,
    **storage_options: Any,
) -> CompressResult:
    """Compress ``model_uri`` (a fine-tune of ``base_uri``, or a PEFT adapter folder, whose
    base is optional) with ComPEFT into ``output_uri``.

    ``spec`` is a :class:`amalgam.recipe.CompressSpec` (default settings when None). Reads one
    tensor pair at a time; nothing is left at ``output_uri`` on failure.
    """
    spec = spec or CompressSpec()
    keep_dense = re.compile(spec.keep_dense) if spec.keep_dense else None
    with ExitStack() as stack:
        model = stack.enter_context(open_checkpoint(model_uri, **storage_options))
        base = _open_base(stack, base_uri, storage_options)
        refs = _references(model, base)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "method": spec.method,
            "paper": PAPER,
            "kind": _kind(model),
            "settings": spec.settings(),
            "base": {"uri": base.uri, "hash": base.content_hash()} if base else None,
            "model": {"uri": model.uri, "hash": model.content_hash()},
            "amalgam": __version__,
            "tensors": {},
        }
        inputs = {"model": model} | ({"base": base} if base else {})
        check_output(output_uri, inputs, overwrite, storage_options)
        writer = CheckpointWriter(
            output_uri, overwrite=overwrite, sources=inputs.values(), **storage_options
        )
        try:
            result = _compress(model, base, refs, writer, spec, keep_dense, manifest)
            result.side_bytes = copy_side_files(model, writer)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    return result


def _kind(ckpt: Checkpoint) -> str:
    return "adapter" if ckpt.kind == "adapter" else "model"


def _open_base(stack: ExitStack, uri: str | None, storage_options: dict) -> Checkpoint | None:
    """The dense base (None when ``uri`` is None); an adapter folder given as base is refused."""
    if uri is None:
        return None
    base = stack.enter_context(open_checkpoint(uri, **storage_options))
    if base.kind == "adapter":
        raise CompressError(
            f"{uri}: the base is an adapter folder; give the dense model it was trained on"
        )
    return base


def _references(model: Checkpoint, base: Checkpoint | None) -> dict[str, str | None]:
    """For each tensor to compress, the base tensor its task vector is taken against (None:
    zero); the tensors left out are stored as they are."""
    if model.kind == "adapter":
        return references(model, base)
    if base is None:
        raise CompressError(f"{model.uri}: a dense model is compressed against its base (--base)")
    pair = {"base": base, "model": model}
    fit = check_compatibility(pair, vocabulary=False, raise_on_error=False)
    if not fit.ok:
        raise CompressError(f"{model.uri}: cannot compress against {base.uri}\n{fit.describe()}")
    return {name: name for name, info in model.tensors.items() if info.is_float}


def _compress(
    model: Checkpoint,
    base: Checkpoint | None,
    refs: dict[str, str | None],
    writer: CheckpointWriter,
    spec: CompressSpec,
    keep_dense: re.Pattern | None,
    manifest: dict[str, Any],
) -> CompressResult:
    spool = ShardSpool(writer, spec.max_shard_size, {"format": "amalgam-compeft"})
    reports = []
    for name, info in model.tensors.items():
        weights = model.tensor(name)
        entry: dict[str, Any] = {"shape": list(info.shape), "dtype": info.dtype}
        if name not in refs or (keep_dense and keep_dense.search(name)):
            stored, kind, kept = [(name, weights)], "dense", info.numel
        else:
            ref = refs[name]
            zero = ref is None or base is None
            tau = weights.to(torch.float32) - (0.0 if zero else base.tensor(ref).float())
            if not bool(torch.isfinite(tau).all()):
                where = "" if zero else f" or its base {base.uri}"
                raise CompressError(f"tensor '{name}': NaN or Inf in {model.uri}{where}")
            ternary = compeft(tau, spec.density, spec.scale, spec.alpha)
            stored, kept = codec.encode(name, ternary), ternary.positions.numel()
            kind = codec.encoding(info.numel, kept)
            entry["base_tensor"] = ref
        file = spool.add(stored)
        manifest["tensors"][name] = {**entry, "encoding": kind, "kept": kept, "file": file}
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
    if manifest.get("format") != FORMAT or manifest.get("method") not in METHODS:
        raise CompressError(
            f"{compressed_uri}/{MANIFEST}: format {manifest.get('format')!r} method "
            f"{manifest.get('method')!r} is not amalgam's format {FORMAT} of "
            + " or ".join(METHODS)
        )
    return manifest


def decompress_model(
    compressed_uri: str,
    base_uri: str | None,
    output_uri: str,
    *,
    overwrite: bool = False,
    max_shard_size: int = 5 * 10**9,
    task: str | None = None,
    **storage_options: Any,
) -> str:
    """Rebuild what was compressed: a dense Hugging Face model folder, or a PEFT adapter folder
    (one ``adapter_model.safetensors`` and the adapter config): reference + scale * sign at the
    kept positions, in each tensor's dtype. A TALL folder rebuilds expert ``task`` (see
    :func:`amalgam.compress.tall.decompress_task`).

    ``base_uri`` defaults to the base recorded at compression; its content hash must match the
    recorded one. An adapter whose tensors were all compressed against zero needs no base.
    Returns the output URI.
    """
    manifest = read_manifest(compressed_uri, **storage_options)
    if manifest["method"] == "tall":
        return decompress_task(
            compressed_uri,
            manifest,
            task,
            base_uri,
            output_uri,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            **storage_options,
        )
    if task is not None:
        raise CompressError(
            f"{compressed_uri}: --task picks an expert of TALL storage; this folder is "
            f"{manifest['method']}"
        )
    kind = manifest.get("kind", "model")
    tensors: dict[str, dict[str, Any]] = manifest["tensors"]
    needs_base = any(_reference(n, t) for n, t in tensors.items() if t["encoding"] != "dense")
    recorded = manifest.get("base")
    base_uri = base_uri or (recorded["uri"] if recorded and needs_base else None)
    if needs_base and base_uri is None:
        raise CompressError(f"{compressed_uri}: compressed against a base; give it (--base)")
    jobs = [
        TensorJob(name, tuple(t["shape"]), t["dtype"], copy=True, layer=None)
        for name, t in tensors.items()
    ]
    units = (
        (WorkUnit(ADAPTER_WEIGHTS, tuple(jobs)),)
        if kind == "adapter"
        else shard_jobs(jobs, max_shard_size)
    )
    with ExitStack() as stack:
        packed = stack.enter_context(open_checkpoint(compressed_uri, **storage_options))
        base = _open_base(stack, base_uri, storage_options)
        _check_kind(packed, kind)
        if base is not None and recorded and base.content_hash() != recorded["hash"]:
            raise CompressError(
                f"{base_uri}: content hash {base.content_hash()} is not the base this model was "
                f"compressed against ({recorded['uri']}, {recorded['hash']})"
            )
        metadata = {"amalgam.decompressed_from": manifest["model"]["hash"]}
        if kind == "adapter":
            metadata["format"] = "pt"
        inputs = {"compressed": packed} | ({"base": base} if base else {})
        check_output(output_uri, inputs, overwrite, storage_options)
        return write_rebuilt(
            output_uri,
            units,
            lambda name: _dense(name, tensors[name], packed, base),
            metadata,
            packed,
            sources=inputs.values(),
            overwrite=overwrite,
            **storage_options,
        )


def _reference(name: str, entry: dict[str, Any]) -> str | None:
    """The base tensor ``name``'s task vector was taken against (None: zero); manifests written
    before adapters were supported name none, and meant the tensor of the same name."""
    return entry.get("base_tensor", name)


def _check_kind(packed: Checkpoint, kind: str) -> None:
    """The manifest's kind is known, and an adapter's config was compressed alongside it."""
    if kind not in ("model", "adapter"):
        raise CompressError(f"{packed.uri}/{MANIFEST}: unknown kind {kind!r}")
    if kind == "adapter" and ADAPTER_CONFIG not in packed.side_files():
        raise CompressError(
            f"{packed.uri}: a compressed adapter without its {ADAPTER_CONFIG}; cannot restore it"
        )


def _dense(
    name: str, entry: dict[str, Any], packed: Checkpoint, base: Checkpoint | None
) -> torch.Tensor:
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    if entry["encoding"] == "dense":
        return packed.tensor(name)
    if entry["encoding"] == losparse.ENCODING:
        parts = [losparse.U, losparse.V, codec.POSITIONS, losparse.VALUES]
        stored = losparse.decode(
            tuple(entry["shape"]), entry["kept"], *(packed.tensor(name + p) for p in parts)
        )
        return stored.dense().to(dtype)
    ternary = codec.decode(
        tuple(entry["shape"]),
        entry["kept"],
        packed.tensor(name + codec.POSITIONS),
        packed.tensor(name + codec.SIGNS),
        float(packed.tensor(name + codec.SCALE)),
    )
    ref = _reference(name, entry)
    delta = ternary.delta()
    if ref is None:
        return delta.to(dtype)
    assert base is not None  # decompress_model opens the base whenever a tensor names one
    return (base.tensor(ref).to(torch.float32) + delta).to(dtype)
