"""The statistics artifact: one safetensors file of per-tensor statistics plus its provenance."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import torch

from amalgam import __version__, storage
from amalgam.checkpoint import file_hash, open_checkpoint
from amalgam.errors import CheckpointError, StatisticsError
from amalgam.statistics.settings import ARTIFACT_KINDS
from amalgam.writer import shard_header

MARKER = "amalgam_statistics"  # metadata key naming the kind


@dataclass(frozen=True)
class StatisticsInfo:
    """What an artifact holds, read from its header alone.

    ``norm`` is the L2 norm of all its tensors together (the whole-model Fisher norm used to
    normalise Fisher merging); ``samples`` the examples used, ``tokens`` the tokens seen.
    """

    uri: str
    kind: str
    model_hash: str
    data_hash: str
    samples: int
    tokens: int
    norm: float
    settings: dict[str, Any]
    content_hash: str
    shapes: dict[str, tuple[int, ...]]


def write_artifact(
    uri: str,
    tensors: dict[str, torch.Tensor],
    *,
    kind: str,
    model_hash: str,
    data_hash: str,
    samples: int,
    tokens: int,
    settings: dict[str, Any],
    **storage_options: Any,
) -> StatisticsInfo:
    """Write ``tensors`` (float32, sorted by name) with their provenance, byte for byte the
    same for the same statistics; the file appears whole or not at all."""
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))
    metadata = {
        "format": "pt",
        MARKER: kind,
        "model_hash": model_hash,
        "data_hash": data_hash,
        "samples": str(samples),
        "tokens": str(tokens),
        "norm": repr(norm),
        "settings": json.dumps(settings, sort_keys=True),
        "amalgam_version": __version__,
    }
    ordered = [(k, v.detach().float().contiguous().cpu()) for k, v in sorted(tensors.items())]
    header = shard_header([(k, "F32", tuple(v.shape)) for k, v in ordered], metadata)
    fs, path = storage.resolve(uri, **storage_options)
    parent = str(PurePosixPath(path).parent)
    fs.makedirs(parent, exist_ok=True)
    staging = storage.join(parent, f".{PurePosixPath(path).name}.partial-{uuid.uuid4().hex[:12]}")
    try:
        with fs.open(staging, "wb") as fh:
            fh.write(header)
            for _, v in ordered:
                fh.write(memoryview(v.reshape(-1).view(torch.uint8).numpy()))
        fs.mv(staging, path)
    except BaseException:
        if fs.exists(staging):
            fs.rm(staging)
        raise
    return read_info(uri, **storage_options)


def read_info(uri: str, **storage_options: Any) -> StatisticsInfo:
    """The header of a statistics artifact; a clear error for anything else."""
    try:
        with open_checkpoint(uri, **storage_options) as ckpt:
            if ckpt.kind != "file":
                raise StatisticsError(f"{uri}: a statistics artifact is one .safetensors file")
            meta = ckpt.metadata[ckpt.files[0]]
            shapes = {n: t.shape for n, t in ckpt.tensors.items()}
            # the file's bytes alone (a model's hash also covers its file names)
            content_hash = "sha256:" + file_hash(ckpt.fs, ckpt.file_path(ckpt.files[0]))
    except CheckpointError as exc:
        raise StatisticsError(f"statistics artifact {exc}") from None
    if meta.get(MARKER) not in ARTIFACT_KINDS:
        raise StatisticsError(f"{uri}: not an amalgam statistics artifact (no '{MARKER}')")
    try:
        return StatisticsInfo(
            uri=str(uri),
            kind=meta[MARKER],
            model_hash=meta["model_hash"],
            data_hash=meta["data_hash"],
            samples=int(meta["samples"]),
            tokens=int(meta["tokens"]),
            norm=float(meta["norm"]),
            settings=json.loads(meta["settings"]),
            content_hash=content_hash,
            shapes=shapes,
        )
    except (KeyError, ValueError) as exc:
        raise StatisticsError(f"{uri}: statistics metadata incomplete or corrupt ({exc})") from None
