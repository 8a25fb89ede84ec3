"""Streaming checkpoint writer: shards written tensor by tensor, staged, committed last."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import torch

from amalgam import __version__, storage
from amalgam.checkpoint import (
    COMMIT_RECORD,
    DTYPE_NAMES,
    Checkpoint,
    file_hash,
    open_checkpoint,
    remember_hash,
    sha256_file,
    tensor_nbytes,
    unfinished_commit,
    written_by_amalgam,
)
from amalgam.errors import AmalgamError, OutputError
from amalgam.uploads import abort_marked, is_s3, open_for_write

if TYPE_CHECKING:
    from amalgam.engine.plan import WorkUnit

INDEX_NAME = "model.safetensors.index.json"
RECORD_FORMAT = 1
PART = ".part-"  # a shard's part in the staging folder: <shard>.part-00003
# In the staging folder: <shard>.amalgam-upload names the open multipart upload of a shard
# written straight to its final key (aborted with the staging folder).
UPLOAD = ".amalgam-upload"
COPIES_IN_FLIGHT = 4  # shards an object-store commit copies into place at once


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


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """A failed write (full disk, read-only or vanished folder, the store refusing or its
    connection failing) is an OutputError naming the file; the cause stays chained, so storage
    retries still see it."""
    try:
        with storage.store_errors():
            yield
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc


class ShardWriter:
    """Writes one safetensors file whose layout is fixed up front; tensors arrive in order.
    The file's sha256 is computed on the way (``digest`` once closed).

    With ``span`` (start, stop), the file is one part of the shard: the bytes of tensors
    ``entries[start:stop]``, after the header only when ``start`` is 0 (see
    :class:`ShardAssembler`). ``deferred`` (S3): ``close`` stores every byte but shows
    nothing at ``path`` until ``complete`` (see :class:`amalgam.uploads.ParallelUpload`)."""

    def __init__(
        self,
        fs: Any,
        path: str,
        entries: Sequence[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str],
        span: tuple[int, int] | None = None,
        *,
        deferred: bool = False,
    ):
        start, stop = span or (0, len(entries))
        self.path = path
        self._fs = fs
        self._pending = list(entries[start:stop])
        self._hash = hashlib.sha256()
        self.nbytes = 0
        self.digest: str | None = None
        size = sum(tensor_nbytes(d, s) for _, d, s in self._pending) + (1 << 20) * (start == 0)
        with writing(path):  # (the header's size bounded by 1 MiB: a hint for part sizes)
            self._fh = open_for_write(fs, path, deferred=deferred, size=size)
        if start == 0:
            self._append(shard_header(entries, metadata))

    def _append(self, data: Any) -> None:
        with writing(self.path):
            self._fh.write(data)
        self._hash.update(data)
        self.nbytes += len(data)

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
        self._append(memoryview(data))
        return data.nbytes

    def discard(self) -> None:
        """Drop a shard that failed midway (an unfinished upload is cancelled)."""
        if storage.is_local(self._fs):
            # the staging folder is removed by the checkpoint writer; a close that fails too
            # (a full disk flushing its buffer) must not hide the first error
            with contextlib.suppress(OSError):
                self._fh.close()
        else:
            self._fh.discard()
            self._fh.closed = True  # fsspec would otherwise try to flush it when collected

    def close(self) -> None:
        with writing(self.path):
            self._fh.close()
        if self._pending:
            raise OutputError(f"{self.path}: {len(self._pending)} planned tensors never written")
        self.digest = self._hash.hexdigest()

    def upload_marker(self) -> bytes:
        """What aborts this deferred shard's upload (:func:`amalgam.uploads.abort_marked`)."""
        return self._fh.marker()

    def stored_bytes(self) -> int:
        """A closed deferred shard's bytes, as the store holds them."""
        with writing(self.path):
            return self._fh.stored_bytes()

    def complete(self) -> None:
        """Put a closed deferred shard in place."""
        self._fh.complete()


@dataclass(frozen=True)
class Written:
    """A file of the output written elsewhere (a Ray worker), as its writer reported it."""

    path: str
    nbytes: int
    digest: str


class ShardAssembler:
    """Puts a shard together from its parts (files that workers wrote, arriving in any order):
    each part is appended as soon as the parts before it are in, checked on the way against
    the size and sha256 its writer reported, then removed. The shard's own sha256 is computed
    while appending (``digest`` once the last part is in)."""

    def __init__(self, fs: Any, path: str, count: int):
        self.path = path
        self._fs = fs
        self._count = count
        self._ready: dict[int, Written] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._hash = hashlib.sha256()
        self.nbytes = 0
        self.digest: str | None = None
        with writing(path):
            self._fh = open_for_write(fs, path)

    def add(self, index: int, part: Written) -> None:
        """Part ``index`` is written: append it and every later part already waiting (safe to
        call from several threads)."""
        with self._lock:
            self._ready[index] = part
            while self._next in self._ready:
                self._append(self._ready.pop(self._next))
                self._next += 1
            if self._next == self._count and self.digest is None:
                with writing(self.path):
                    self._fh.close()
                self.digest = self._hash.hexdigest()

    def _append(self, part: Written) -> None:
        check = hashlib.sha256()
        n = 0
        with storage.store_errors(part.path), self._fs.open(part.path, "rb") as src:
            while chunk := src.read(16 << 20):
                check.update(chunk)
                self._hash.update(chunk)
                with writing(self.path):
                    self._fh.write(chunk)
                n += len(chunk)
        if (n, check.hexdigest()) != (part.nbytes, part.digest):
            raise OutputError(
                f"{part.path}: a part of {self.path} holds {n} bytes with sha256 "
                f"{check.hexdigest()[:12]}, its writer reported {part.nbytes} bytes with sha256 "
                f"{part.digest[:12]}"
            )
        self.nbytes += n
        with storage.store_errors(part.path):
            self._fs.rm_file(part.path)


class CheckpointWriter:
    """A model folder written into a hidden staging folder and moved into place by ``commit``.

    A crash leaves only the staging folder (``.<name>.partial-<host>-<pid>-*``, removed by the
    next writer of the same output once that process is gone), never something that looks
    like a finished model. ``commit`` writes :data:`COMMIT_RECORD` last: every file of the
    output with its size and sha256, so a later run can tell a complete, unchanged output from
    anything else, and ``overwrite`` replaces only folders amalgam wrote.

    ``sources`` are the opened checkpoints the output is built from (adapters, stacked inputs:
    the checkpoints under them are taken, :meth:`Checkpoint.stored_parts`): ``commit`` refuses
    to put the output in place when a file of one of them changed since it was opened (a
    model rewritten while it was read would give an output mixing two versions of it,
    recorded under the old one's hash); the staging folder is then removed. Keep them open
    until the commit (the files they read are checked).
    """

    def __init__(
        self,
        uri: str,
        *,
        overwrite: bool = False,
        staging: str | None = None,
        sources: Iterable[Checkpoint] = (),
        **storage_options: Any,
    ):
        self.uri = str(uri)
        parts = [part for ckpt in sources for part in ckpt.stored_parts()]
        self._sources = list({id(part): part for part in parts}.values())
        self.storage_options = storage_options
        self.fs, self.path = storage.resolve(self.uri, **storage_options)
        self.overwrite = overwrite
        remove_leftovers(self.fs, self.path)
        if output_taken(self.fs, self.path):
            if not overwrite:
                raise OutputError(f"{self.uri}: output exists (pass --overwrite to replace it)")
            check_replaceable(self.fs, self.path, self.uri)
        p = PurePosixPath(self.path)
        self.staging = staging or str(p.parent / f"{staging_prefix(p.name)}{uuid.uuid4().hex[:12]}")
        with writing(self.staging):
            self.fs.makedirs(self.staging, exist_ok=True)
        self._shards: list[ShardWriter | ShardAssembler | Written] = []
        self._planned: dict[str, int] = {}
        self._direct: dict[str, ShardWriter] = {}  # shards uploaded to their final keys

    @property
    def staging_uri(self) -> str:
        return storage.full_uri(self.fs, self.staging)

    def shard(
        self,
        filename: str,
        entries: Sequence[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str],
    ) -> ShardWriter:
        """A shard of the output. On S3 it is uploaded straight to its final key as a multipart
        upload that the commit completes (no copy from the staging folder); until then nothing
        of it is visible, and its upload is named in the staging folder, so that an abort, or
        the next writer after a crash, aborts it. Elsewhere it is written in the staging
        folder."""
        if not is_s3(self.fs):
            shard = ShardWriter(self.fs, storage.join(self.staging, filename), entries, metadata)
        else:
            path = storage.join(self.path, filename)
            shard = ShardWriter(self.fs, path, entries, metadata, deferred=True)
            self._direct[filename] = shard
            marker = storage.join(self.staging, filename + UPLOAD)
            with writing(marker):
                self.fs.pipe_file(marker, shard.upload_marker())
        self._shards.append(shard)
        return shard

    def expect(self, sizes: dict[str, int]) -> None:
        """The weight files the output must hold, with their sizes: the commit refuses an
        output where one is missing or of another size."""
        self._planned.update(sizes)

    def written(self, filename: str, nbytes: int, digest: str) -> None:
        """Shard ``filename`` was written into the staging folder elsewhere (a Ray worker),
        ``nbytes`` bytes with sha256 ``digest``: the commit record takes them (after checking
        the size on storage) instead of reading the file back."""
        self._shards.append(Written(storage.join(self.staging, filename), nbytes, digest))

    def part_uri(self, filename: str, index: int) -> str:
        """Where part ``index`` of shard ``filename`` is written (see :meth:`assembler`)."""
        return storage.full_uri(self.fs, self.part_path(filename, index))

    def assembler(self, filename: str, count: int) -> ShardAssembler:
        """Shard ``filename``, put together from its ``count`` parts at :meth:`part_uri`."""
        shard = ShardAssembler(self.fs, storage.join(self.staging, filename), count)
        self._shards.append(shard)
        return shard

    def part_path(self, filename: str, index: int) -> str:
        return storage.join(self.staging, f"{filename}{PART}{index:05d}")

    def write_json(self, filename: str, obj: Any) -> None:
        path = storage.join(self.staging, filename)
        with writing(path), self.fs.open(path, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)

    def write_units(
        self,
        units: Sequence[WorkUnit],
        tensor: Callable[[str], torch.Tensor],
        metadata: dict[str, str],
    ) -> None:
        """Write each unit as one shard, ``tensor(name)`` read as each tensor is written, and
        the index when there are several shards."""
        for unit in units:
            shard = self.shard(unit.file, unit.entries(), metadata)
            try:
                for job in unit.jobs:
                    shard.write(job.name, tensor(job.name))
            except BaseException:
                shard.discard()
                raise
            shard.close()
        if len(units) > 1:
            weight_map = {j.name: u.file for u in units for j in u.jobs}
            total = sum(u.nbytes for u in units)
            self.write_json(
                INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map}
            )

    def copy_in(self, src_fs: Any, src_path: str, filename: str) -> None:
        """Copy one file into the output as ``filename`` (a relative path: folders made)."""
        path = storage.join(self.staging, filename)
        if "/" in filename:
            self.fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        with (
            writing(path),
            src_fs.open(src_path, "rb") as src,
            self.fs.open(path, "wb") as dst,
        ):
            while chunk := src.read(16 << 20):
                dst.write(chunk)

    def commit(self) -> None:
        """Put the staged folder in place, :data:`COMMIT_RECORD` last. Without ``overwrite``,
        an output that appeared since the writer opened (a concurrent run) is an error, not
        replaced.

        Locally the folder is renamed into place under a lock on the parent folder (an
        existing output is swapped out atomically where the kernel can, and kept until the new
        one is in place).

        An object store has no rename, so the guarantee there is this. Every new file is
        fully written before the output is touched: in the staging folder, or (S3 shards) as
        a multipart upload to its final key, whose parts are stored but invisible until
        completed; until then an old output stays complete and readable, record included.
        The commit then removes the old record, completes the shards' uploads or copies the
        new files in (weights first, the index last), removes files the
        new output does not have (an old index first), and writes the new record last. From
        the removal of the old record until the new one is written, the folder holds
        amalgam's shards without a record: readers refuse it
        (:func:`amalgam.checkpoint.open_checkpoint`,
        :func:`amalgam.discover.discover_checkpoints`) and ``intact`` is false, so it never
        reads as a finished mix of old and new files. A run killed at any point of this
        leaves the old output, nothing, such an unfinished folder, or the new output; the
        next writer of the output replaces an unfinished folder, with or without
        ``overwrite``, and ends with a complete output. A commit that fails midway (the
        store refusing after its retries) is an :class:`OutputError` naming the output,
        which then reads as unfinished. Two runs committing one output at the same moment
        are not serialised there (a store offers no lock): their files may interleave, and
        the folder is complete only when its record matches its files (``intact``).

        Before anything is put in place, every source must be unchanged since it was opened,
        else the :class:`CheckpointError` naming the changed file is raised and the staging
        folder removed: nothing of the output becomes visible."""
        record = self._record()
        self._check_sources()
        if storage.is_local(self.fs):
            self.write_json(COMMIT_RECORD, record)
            with _folder_lock(str(PurePosixPath(self.path).parent)):
                self._check_free()
                _replace_local(self.staging, self.path)
        else:
            self._check_free()
            with writing(self.uri):
                self._copy_into_place(record)
            self.abort()  # the staging folder; left to the next writer if the store refuses
        self._remember(record)

    def _check_sources(self) -> None:
        """Every source's files unchanged since opened (see the class); else abort."""
        try:
            for part in self._sources:
                part.check_unchanged()
        except BaseException:
            self.abort()
            raise

    def _copy_into_place(self, record: dict[str, Any]) -> None:
        """The object-store commit (see :meth:`commit`): old record out, files in, stale
        files out, new record in. Shards uploaded to their final keys are completed (one
        request each) instead of copied."""
        old = set(file_sizes(self.fs, self.path)) if self.fs.exists(self.path) else set()
        if COMMIT_RECORD in old:
            self.fs.rm_file(storage.join(self.path, COMMIT_RECORD))
        weights_first = sorted(
            record["files"], key=lambda f: (f == INDEX_NAME, not f.endswith(".safetensors"), f)
        )
        shards = [n for n in weights_first if n.endswith(".safetensors")]
        with ThreadPoolExecutor(COPIES_IN_FLIGHT, thread_name_prefix="amalgam-commit") as pool:
            for _ in pool.map(self._copy_in, shards):  # the store copies; several at once
                pass
        for name in weights_first[len(shards) :]:
            self._copy_in(name)
        stale = old - set(record["files"]) - {COMMIT_RECORD}
        for name in sorted(stale, key=lambda f: (f != INDEX_NAME, f)):  # an old index first
            self.fs.rm_file(storage.join(self.path, name))
        self.fs.pipe_file(
            storage.join(self.path, COMMIT_RECORD),
            json.dumps(record, indent=2, sort_keys=True).encode(),
        )
        self.fs.invalidate_cache(self.path)

    def _copy_in(self, name: str) -> None:
        if name in self._direct:
            self._direct[name].complete()
            return
        self.fs.copy(storage.join(self.staging, name), storage.join(self.path, name))

    def _remember(self, record: dict[str, Any]) -> None:
        """The committed files' hashes go to the hash cache: the output's content hash and
        :func:`intact` then read nothing."""
        for name, entry in record["files"].items():
            remember_hash(self.fs, storage.join(self.path, name), entry["sha256"])

    def _check_free(self) -> None:
        if output_taken(self.fs, self.path):
            if not self.overwrite:
                raise OutputError(
                    f"{self.uri}: output appeared while writing (another run wrote it)"
                )
            check_replaceable(self.fs, self.path, self.uri)

    def _record(self) -> dict[str, Any]:
        """Every staged file's size and sha256 (shards hashed while written or assembled, or as
        the worker that wrote them reported; other files read back once), after checking that
        every planned file is there with its planned size and no part is left over."""
        sizes = {n: s for n, s in file_sizes(self.fs, self.staging).items() if UPLOAD not in n}
        sizes.update({name: shard.stored_bytes() for name, shard in self._direct.items()})
        problems = [
            f"{name}: planned {want} bytes, "
            + ("missing" if name not in sizes else f"holds {sizes[name]}")
            for name, want in sorted(self._planned.items())
            if sizes.get(name) != want
        ]
        problems += [f"{name}: a part never put into its shard" for name in sizes if PART in name]
        known = {PurePosixPath(s.path).name: s for s in self._shards if s.digest}
        problems += [
            f"{name}: its writer reported {s.nbytes} bytes, storage holds {sizes.get(name)}"
            for name, s in known.items()
            if sizes.get(name) != s.nbytes
        ]
        if problems:
            raise OutputError(
                f"{self.uri}: not committed, the output is incomplete:\n  " + "\n  ".join(problems)
            )
        files = {}
        for name in sorted(sizes):
            if name in known:
                files[name] = {"bytes": known[name].nbytes, "sha256": known[name].digest}
                continue
            path = storage.join(self.staging, name)
            files[name] = {"bytes": sizes[name], "sha256": sha256_file(self.fs, path)}
        return {"format": RECORD_FORMAT, "amalgam_version": __version__, "files": files}

    def abort(self) -> None:
        """Remove the staging folder. A store that refuses leaves it to the next writer of
        the output, and the error that caused the abort stays the one reported. Shard uploads
        not completed are aborted (a store that refuses leaves them named in the staging
        folder)."""
        with contextlib.suppress(OSError), storage.store_errors(self.staging_uri):
            for shard in self._direct.values():
                shard.discard()
            remove_folder(self.fs, self.staging)


def staging_prefix(name: str, kind: str = "partial") -> str:
    """Hidden work folders of output ``name`` written by this process start with this
    (``partial``: a commit's staging; ``steps``: a continual merge's intermediate steps)."""
    return f".{name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def remove_stale_staging(fs: Any, parent: str, name: str, kind: str = "partial") -> None:
    """Remove work folders of output ``name`` left by processes of this host that are gone
    (a killed run); another host's are left alone (their owner cannot be checked from here)."""
    for path in _dead_work(fs, parent, name, kind):
        remove_work(fs, path)


def _dead_work(fs: Any, parent: str, name: str, kind: str) -> list[str]:
    """Paths of the work folders of output ``name`` whose process (of this host) is gone."""
    host = socket.gethostname()
    try:
        siblings = fs.ls(parent, detail=False)
    except FileNotFoundError:
        return []
    pattern = re.compile(rf"\.{re.escape(name)}\.{kind}-{re.escape(host)}-(\d+)-")
    found = [(p, pattern.match(PurePosixPath(p).name)) for p in siblings]
    return [p for p, m in found if m and not process_alive(int(m.group(1)))]


def remove_leftovers(fs: Any, path: str) -> None:
    """Remove what killed processes of this host left next to the output at ``path``: their
    staging folders, and an old output that a commit swapped out but did not get to delete.
    A commit killed between the two renames of :func:`_replace_local`'s fallback left no
    output at all: the old one is put back. A writer calls it when it opens; a run that finds
    the output finished and skips it calls it too (nothing else would)."""
    p = PurePosixPath(path)
    dead = _dead_work(fs, str(p.parent), p.name, "partial")
    aside = [d for d in dead if d.endswith(".old")]
    if aside and storage.is_local(fs) and not os.path.lexists(path):
        os.rename(aside[0], path)
        dead.remove(aside[0])
    for folder in dead:
        remove_work(fs, folder)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_record(fs: Any, path: str) -> dict[str, Any] | None:
    """The commit record of the output folder at ``path``, or None (none, or unreadable)."""
    try:
        with fs.open(storage.join(path, COMMIT_RECORD), "rb") as fh:
            record = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def intact(fs: Any, path: str) -> bool:
    """True when the output folder at ``path`` is complete and unchanged since its commit:
    every file of its record with the recorded size and sha256 (hashes cached by file stamp,
    so an unchanged output is not read again), and no weight file the record does not list."""
    record = read_record(fs, path)
    if record is None:
        return False
    try:
        names = set(file_sizes(fs, path))
        for name, entry in record["files"].items():
            where = storage.join(path, name)
            if name not in names or fs.size(where) != entry.get("bytes"):
                return False
            if file_hash(fs, where) != entry.get("sha256"):
                return False
    except (OSError, TypeError, AttributeError):
        return False
    weights = {n for n in names if n.endswith(".safetensors") or n == INDEX_NAME}
    return weights <= set(record["files"])


def committed_with(uri: str, field: str, value: str, **storage_options: Any) -> bool:
    """``uri`` is a complete, unchanged commit whose shards' metadata give ``field`` the value
    ``value`` (a content key); what a killed writer left beside it is removed first, also when
    the caller then skips the work."""
    fs, path = storage.resolve(uri, **storage_options)
    remove_leftovers(fs, path)
    if not intact(fs, path):
        return False
    try:
        with open_checkpoint(uri, **storage_options) as ckpt:
            metas = list(ckpt.metadata.values())
    except AmalgamError:
        return False
    return bool(metas) and metas[0].get(field) == value


def output_taken(fs: Any, path: str) -> bool:
    """True when something is at ``path``; an unfinished amalgam commit on an object store
    (shards without a commit record: a run killed or failed while committing) does not count,
    since it holds no finished model and the next writer of the output replaces it."""
    if not fs.exists(path):
        return False
    if storage.is_local(fs) or not fs.isdir(path):
        return True
    return not unfinished_commit(fs, path, set(_ls_names(fs, path)))


def file_sizes(fs: Any, path: str) -> dict[str, int]:
    """Path relative to the folder ``path`` -> size, of every file under it (sentence-
    transformers module configs sit one folder down, ``1_Pooling/config.json``)."""
    fs.invalidate_cache(path)
    root = PurePosixPath(fs._strip_protocol(path))
    return {
        str(PurePosixPath(name).relative_to(root)): info["size"]
        for name, info in fs.find(path, detail=True).items()
    }


def _ls_names(fs: Any, path: str) -> list[str]:
    fs.invalidate_cache(path)
    return [PurePosixPath(f).name for f in fs.ls(path, detail=False)]


def check_replaceable(fs: Any, path: str, uri: str) -> None:
    """``--overwrite`` replaces an empty folder or one amalgam wrote (a commit record, or the
    amalgam metadata of outputs from before records); anything else is refused."""
    if not fs.isdir(path):
        raise OutputError(
            f"{uri}: exists and is not a folder; --overwrite replaces only outputs amalgam wrote"
        )
    names = [PurePosixPath(f).name for f in fs.ls(path, detail=False)]
    if not names or COMMIT_RECORD in names or written_by_amalgam(fs, path, names):
        return
    raise OutputError(
        f"{uri}: exists and holds no amalgam output (no {COMMIT_RECORD}); --overwrite replaces "
        "only outputs amalgam wrote: remove it yourself or choose another output"
    )


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """An exclusive lock on a local folder (flock on its descriptor) for a commit's renames."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _replace_local(staging: str, path: str) -> None:
    """Rename ``staging`` to ``path``; an existing ``path`` is exchanged with it atomically
    (renameat2 RENAME_EXCHANGE) where the kernel and filesystem allow, else renamed aside
    first, and removed once the new folder is in place. Never moves one folder into another."""
    if not os.path.lexists(path):
        try:
            os.rename(staging, path)
        except OSError as exc:  # appeared meanwhile, outside amalgam's lock
            raise OutputError(f"{path}: cannot put the output in place ({exc})") from None
        return
    if not _exchange(staging, path):
        old = f"{staging}.old"
        os.rename(path, old)
        os.rename(staging, path)
        staging = old
    shutil.rmtree(staging, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2); False where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def remove_work(fs: Any, folder: str) -> None:
    """Remove a dead writer's work folder, after aborting the shard uploads it names (one a
    commit completed is no longer open: the store refuses, and that is ignored)."""
    if not storage.is_local(fs):
        with contextlib.suppress(FileNotFoundError):
            for path in fs.find(folder):
                if path.endswith(UPLOAD):
                    with contextlib.suppress(OSError), storage.store_errors(path):
                        abort_marked(fs, fs.cat_file(path))
    remove_folder(fs, folder)


def remove_folder(fs: Any, path: str, folder: bool = True) -> None:
    """Delete a folder (or with ``folder=False`` a file) if present; on object stores also the
    folder marker some keep."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=folder)
    if not storage.is_local(fs):
        if folder:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path + "/")
        fs.invalidate_cache(path)
