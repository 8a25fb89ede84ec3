"""Streaming checkpoint writer: shards written tensor by tensor, staged, committed last."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

import torch

from amalgam import storage
from amalgam.checkpoint import DTYPE_NAMES, tensor_nbytes
from amalgam.errors import OutputError

INDEX_NAME = "model.safetensors.index.json"


def shard_header(
    entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
) -> bytes:
    """The 8-byte length plus JSON header of a safetensors file whose tensors follow in order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        n = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Writes one safetensors file whose layout is fixed up front; tensors arrive in order."""

    def __init__(
        self,
        fs: Any,
        path: str,
        entries: Sequence[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str],
    ):
        self.path = path
        self._fs = fs
        self._pending = list(entries)
        self._fh = fs.open(path, "wb")
        self._fh.write(shard_header(entries, metadata))

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append ``tensor``: the next planned tensor, with the planned dtype and shape."""
        want_name, want_dtype, want_shape = self._pending.pop(0)
        got_dtype = DTYPE_NAMES[tensor.dtype]
        if (name, got_dtype, tuple(tensor.shape)) != (want_name, want_dtype, tuple(want_shape)):
            raise OutputError(
                f"{self.path}: expected {want_name} {want_dtype}{list(want_shape)}, "
                f"got {name} {got_dtype}{list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))
        return data.nbytes

    def discard(self) -> None:
        """Drop a shard that failed midway (an unfinished upload is cancelled)."""
        if storage.is_local(self._fs):
            self._fh.close()  # the staging folder is removed by the checkpoint writer
        else:
            self._fh.discard()
            self._fh.closed = True  # fsspec would otherwise try to flush it when collected

    def close(self) -> None:
        self._fh.close()
        if self._pending:
            raise OutputError(f"{self.path}: {len(self._pending)} planned tensors never written")


class CheckpointWriter:
    """A model folder written into a hidden staging folder and moved into place by ``commit``.

    A crash leaves only the staging folder (named ``.<name>.partial-*``), never something
    that looks like a finished model.
    """

    def __init__(
        self,
        uri: str,
        *,
        overwrite: bool = False,
        staging: str | None = None,
        **storage_options: Any,
    ):
        self.uri = str(uri)
        self.storage_options = storage_options
        self.fs, self.path = storage.resolve(self.uri, **storage_options)
        self.overwrite = overwrite
        if self.fs.exists(self.path) and not overwrite:
            raise OutputError(f"{self.uri}: output exists (pass --overwrite to replace it)")
        p = PurePosixPath(self.path)
        self.staging = staging or str(p.parent / f".{p.name}.partial-{uuid.uuid4().hex[:12]}")
        self.fs.makedirs(self.staging, exist_ok=True)

    @property
    def staging_uri(self) -> str:
        return storage.full_uri(self.fs, self.staging)

    def shard(
        self,
        filename: str,
        entries: Sequence[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str],
    ) -> ShardWriter:
        return ShardWriter(self.fs, storage.join(self.staging, filename), entries, metadata)

    def write_json(self, filename: str, obj: Any) -> None:
        with self.fs.open(storage.join(self.staging, filename), "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)

    def copy_in(self, src_fs: Any, src_path: str, filename: str) -> None:
        with (
            src_fs.open(src_path, "rb") as src,
            self.fs.open(storage.join(self.staging, filename), "wb") as dst,
        ):
            while chunk := src.read(16 << 20):
                dst.write(chunk)

    def commit(self) -> None:
        """Move the staged folder into place; the index (if any) lands last. Without
        ``overwrite``, an output that appeared since the writer opened (a concurrent run) is
        an error, not replaced."""
        if not self.overwrite and self.fs.exists(self.path):
            raise OutputError(f"{self.uri}: output appeared while writing (another run wrote it)")
        if storage.is_local(self.fs):
            old = None
            if self.fs.exists(self.path):
                old = f"{self.staging}.old"
                self.fs.mv(self.path, old, recursive=True)
            self.fs.mv(self.staging, self.path, recursive=True)
            if old:
                self.fs.rm(old, recursive=True)
            return
        if self.fs.exists(self.path):
            self._remove(self.path)
        files = sorted(self.fs.ls(self.staging, detail=False), key=lambda f: f.endswith(INDEX_NAME))
        for f in files:
            self.fs.copy(f, storage.join(self.path, PurePosixPath(f).name))
        self._remove(self.staging)

    def abort(self) -> None:
        self._remove(self.staging)

    def _remove(self, path: str) -> None:
        remove_folder(self.fs, path)


def remove_folder(fs: Any, path: str) -> None:
    """Delete a folder if present; on object stores also its folder marker (some keep one)."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)
    if not storage.is_local(fs):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path + "/")
        fs.invalidate_cache(path)
