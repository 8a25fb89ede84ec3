"""Lazy checkpoints: safetensors headers at open, one tensor's byte range per read."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import torch

from amalgam import reads, storage
from amalgam.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000
READ_ATTEMPTS = 3  # ranged reads that come back short, on top of the store client's retries
COMMIT_RECORD = "amalgam-commit.json"  # written last by amalgam's writer (writer.py)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_FILES = ("model.safetensors.index.json",)
SINGLE_FILES = ("model.safetensors", "adapter_model.safetensors")
#: Every file a tokenizer saved next to a model may have.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
)
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, "adapter_config.json")
#: A sentence-transformers folder's own files; its ``modules.json`` also names module folders
#: (``1_Pooling``) whose ``config.json`` says how the encoder pools.
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor with safetensors dtype name ``dtype`` and ``shape``."""
    n = SAFETENSORS_DTYPES[dtype].itemsize
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.torch_dtype.is_floating_point


class _DuplicateKey(ValueError):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a key given twice is an error (json.loads would keep the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_header(raw_len: bytes, read_json: Any, file: str, file_size: int) -> tuple[dict, int]:
    """Validate a safetensors header; return (entries, absolute data start).

    ``read_json(n)`` returns the n header bytes following the 8-byte length. The rules are the
    ``safetensors`` library's: a bounded length, a UTF-8 JSON object (trailing spaces allowed),
    no key given twice, ``__metadata__`` a string-to-string map.
    """
    if len(raw_len) < 8:
        raise CheckpointError(f"{file}: truncated safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw_len)
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CheckpointError(
            f"{file}: corrupt safetensors header (declared length {n}, file size {file_size})"
        )
    raw = read_json(n)
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    try:
        header = json.loads(raw, object_pairs_hook=_unique)
    except _DuplicateKey as exc:
        raise CheckpointError(f"{file}: corrupt safetensors header (key {exc} twice)") from None
    except RecursionError:
        raise CheckpointError(f"{file}: corrupt safetensors header (nested too deeply)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(
            f"{file}: corrupt safetensors header (__metadata__ must map strings to strings)"
        )
    return header, 8 + n


def _naturals(value: Any) -> bool:
    """A JSON list of non-negative integers (booleans are not integers here)."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _tensor_infos(header: dict, file: str, data_start: int, file_size: int) -> list[TensorInfo]:
    """Every tensor entry checked, and the entries together: sorted by offset they must tile
    the data from its start to the end of the file, without gap, overlap or trailing bytes."""
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError(f"{file}: tensor '{name}' has a malformed entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not _naturals(shape) or not _naturals(offsets) or len(offsets) != 2:
            raise CheckpointError(
                f"{file}: tensor '{name}' has a malformed entry (shape and data_offsets must "
                f"be lists of non-negative integers, got {shape!r} and {offsets!r})"
            )
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor '{name}' has unsupported dtype {dtype!r}")
        a, b = offsets
        info = TensorInfo(
            name, dtype, tuple(shape), PurePosixPath(file).name, data_start + a, data_start + b
        )
        if b < a or info.nbytes != tensor_nbytes(dtype, info.shape) or info.end > file_size:
            raise CheckpointError(
                f"{file}: tensor '{name}' has byte range [{a}, {b}) that does not fit its "
                f"shape {list(shape)} {dtype} or the file ({file_size} bytes): truncated or corrupt"
            )
        infos.append(info)
    end = data_start
    for info in sorted(infos, key=lambda i: (i.start, i.end)):
        if info.start != end:
            what = "overlaps the tensor before it" if info.start < end else "leaves a gap before it"
            raise CheckpointError(
                f"{file}: tensor '{info.name}' starts at data offset {info.start - data_start}, "
                f"which {what} (ends at {end - data_start}): corrupt"
            )
        end = info.end
    if end != file_size:
        raise CheckpointError(
            f"{file}: {file_size} bytes on storage but the header describes {end}; "
            "the file has trailing bytes after its last tensor"
        )
    return infos


class Checkpoint:
    """A read-only, lazily read model: folder, sharded folder, adapter or single file."""

    config_edited = False  # ``config`` differs from the config.json file (stacked inputs)

    def __init__(self, uri: str, *, allow_pickle: bool = False, **storage_options: Any):
        self.uri = str(uri)
        self.storage_options = storage_options
        self.fs, self.path = storage.resolve(self.uri, **storage_options)
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._ranges = reads.RangeReader(self._cat)
        self._sizes: dict[str, int] = {}  # weight file -> bytes, from the headers' reads
        self._stamps: dict[str, str | None] = {}  # weight file -> its file_stamp when opened
        self._pickled: dict[str, torch.Tensor] | None = None
        self.metadata: dict[str, dict[str, str]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._listing: set[str] | None = None  # the folder's file names, when it is one
        try:
            with storage.store_errors():
                self.kind, self.root, self.files = self._layout(allow_pickle)
                if self._pickled is None:
                    for f in self.files:
                        self._read_header(f)
                self._check_finished()
                self.config: dict | None = self._json_or_none("config.json") or self._json_or_none(
                    "adapter_config.json"
                )
        except OSError as exc:  # the store refused (credentials, network, permissions)
            raise CheckpointError(f"{self.uri}: cannot read ({exc})") from exc

    # -- layout -------------------------------------------------------------------------------
    def _layout(self, allow_pickle: bool) -> tuple[str, str, list[str]]:
        fs, path = self.fs, self.path
        if not fs.exists(path):
            raise CheckpointError(f"{self.uri}: no such checkpoint")
        if not fs.isdir(path):
            root, name = str(PurePosixPath(path).parent), PurePosixPath(path).name
            if name.endswith(PICKLE_SUFFIXES):
                return self._load_pickle(root, [name], allow_pickle)
            if not name.endswith(".safetensors"):
                raise CheckpointError(f"{self.uri}: not a .safetensors file or model folder")
            return "file", root, [name]
        names = {PurePosixPath(p).name for p in fs.ls(path, detail=False)}
        self._listing = names
        for index in INDEX_FILES:
            if index in names:
                weight_map = self._read_json(storage.join(path, index)).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise CheckpointError(f"{self.uri}/{index}: no weight_map")
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if f not in names]
                if missing and unfinished_commit(fs, path, names):
                    raise self._unfinished()
                if missing:
                    raise CheckpointError(f"{self.uri}/{index}: shard files missing: {missing}")
                return "model", path, files
        for single in SINGLE_FILES:
            if single in names:
                return ("adapter" if single.startswith("adapter") else "model"), path, [single]
        shards = sorted(n for n in names if n.endswith(".safetensors"))
        if shards:
            return "model", path, shards
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            return self._load_pickle(path, pickles, allow_pickle)
        raise CheckpointError(f"{self.uri}: folder holds no .safetensors weights")

    def _check_finished(self) -> None:
        """On an object store, a folder whose shards amalgam wrote but that holds no commit
        record is a commit that was interrupted or is still running: refused (files are
        copied one by one there, so it may mix old and new files)."""
        if self._listing is None or storage.is_local(self.fs) or COMMIT_RECORD in self._listing:
            return
        if any(amalgam_marks(meta) for meta in self.metadata.values()):
            raise self._unfinished()

    def _unfinished(self) -> CheckpointError:
        return CheckpointError(
            f"{self.uri}: unfinished amalgam output (shards without {COMMIT_RECORD}: its "
            "commit was interrupted or is still running); run the command that writes it again"
        )

    def _load_pickle(self, root: str, files: list[str], allow: bool) -> tuple[str, str, list[str]]:
        if not allow:
            raise CheckpointError(
                f"{self.uri}: refusing pickle checkpoint {files[0]} (pickle can run code); "
                "convert it to safetensors or pass --allow-pickle"
            )
        self._pickled = {}
        for f in files:
            with self.fs.open(storage.join(root, f), "rb") as fh:
                try:
                    state = torch.load(fh, map_location="cpu", weights_only=True)
                except Exception as exc:
                    raise CheckpointError(f"{self.uri}/{f}: cannot load pickle: {exc}") from exc
            if not isinstance(state, dict):
                raise CheckpointError(f"{self.uri}/{f}: pickle does not hold a state dict")
            for name, t in state.items():
                if not isinstance(t, torch.Tensor):
                    continue
                t = t.contiguous()
                self._pickled[name] = t
                self.tensors[name] = TensorInfo(
                    name, DTYPE_NAMES[t.dtype], tuple(t.shape), f, 0, t.numel() * t.element_size()
                )
        kind = "adapter" if any(f.startswith("adapter") for f in files) else "model"
        return kind, root, files

    def _read_json(self, path: str) -> dict:
        try:
            with self.fs.open(path, "rb") as fh:
                return json.loads(fh.read())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{storage.full_uri(self.fs, path)}: unreadable JSON ({exc})"
            ) from None

    def _json_or_none(self, name: str) -> dict | None:
        if self.kind == "file":
            return None
        path = storage.join(self.root, name)
        return self._read_json(path) if self.fs.exists(path) else None

    def _read_header(self, file: str) -> None:
        path = storage.join(self.root, file)
        label = storage.full_uri(self.fs, path)
        info = self.fs.info(path)
        size = self._sizes[file] = int(info["size"])
        self._stamps[file] = stamp_of(self.fs, info)
        with self.fs.open(path, "rb", block_size=0 if storage.is_local(self.fs) else 1 << 16) as fh:

            def read_json(n: int) -> bytes:
                data = fh.read(n)
                if len(data) != n:
                    raise CheckpointError(f"{label}: short read of the header ({len(data)} of {n})")
                return data

            header, data_start = parse_header(fh.read(8), read_json, label, size)
        meta = header.get("__metadata__") or {}
        self.metadata[file] = {str(k): str(v) for k, v in meta.items()}
        for info in _tensor_infos(header, label, data_start, size):
            if info.name in self.tensors:
                raise CheckpointError(f"{label}: tensor '{info.name}' also in another shard")
            self.tensors[info.name] = info

    # -- queries ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.uri}: no tensor '{name}'") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).torch_dtype

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def file_path(self, file: str) -> str:
        return storage.join(self.root, file)

    # -- reads --------------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (exactly its byte range) into a fresh CPU tensor."""
        info = self.info(name)
        if self._pickled is not None:
            return self._pickled[name].clone()
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            if storage.is_local(self.fs):
                self._pread(info, buf)
            else:
                self._fetch(info, buf)
        return buf.view(info.torch_dtype).reshape(info.shape)

    def view(self, name: str) -> torch.Tensor:
        """One tensor, without a copy where possible: a local tensor of at least
        :data:`reads.MAP_MIN_BYTES` whose offset suits its dtype is a view on a private
        mapping of its bytes (:func:`reads.mapped`: writing to it never changes the file;
        unmapped when the view is dropped); anything else is a fresh tensor as from
        :meth:`tensor`. Keep it no longer than needed: its pages count in this process's
        memory while it lives."""
        info = self.info(name)
        if not self._mappable(info):
            return self.tensor(name)
        fd = self._fd(info.file)
        if os.fstat(fd).st_size < info.end:  # a mapping's pages past the end fault (SIGBUS)
            raise CheckpointError(
                f"{self.uri}/{info.file}: truncated since it was opened (reading '{info.name}')"
            )
        raw = reads.mapped(fd, info.start, info.end)
        return raw.view(info.torch_dtype).reshape(info.shape)

    def _mappable(self, info: TensorInfo) -> bool:
        return (
            self._pickled is None
            and info.nbytes >= reads.MAP_MIN_BYTES
            and info.start % info.torch_dtype.itemsize == 0
            and storage.is_local(self.fs)
        )

    def _fetch(self, info: TensorInfo, buf: torch.Tensor) -> None:
        """The tensor's byte range from a store into ``buf``, as large ranged requests several
        at a time, reading ahead when tensors are read in file order
        (:class:`reads.RangeReader`)."""
        path = self.file_path(info.file)
        try:
            self._ranges.read(path, self._sizes[info.file], info.start, info.end, buf)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} (reading tensor '{info.name}')") from exc.__cause__

    def _cat(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the file at ``path`` on a store, exactly: a read that
        comes back short is tried again (:data:`READ_ATTEMPTS` in all); the store client has
        already retried errors and bodies cut short before their Content-Length."""
        where = storage.full_uri(self.fs, path)
        got = 0
        for _ in range(READ_ATTEMPTS):
            try:
                with storage.store_errors():
                    data = self.fs.cat_file(path, start=start, end=end)
            except OSError as exc:
                raise CheckpointError(f"{where}: cannot read bytes {start}-{end} ({exc})") from exc
            if len(data) == end - start:
                return data
            got = len(data)
        raise CheckpointError(
            f"{where}: short read of bytes {start}-{end} ({got} of {end - start}, "
            f"{READ_ATTEMPTS} attempts)"
        )

    def _pread(self, info: TensorInfo, buf: torch.Tensor) -> None:
        fd = self._fd(info.file)
        view = memoryview(buf.numpy())
        done = 0
        while done < info.nbytes:
            n = os.preadv(fd, [view[done:]], info.start + done)
            if n <= 0:
                raise CheckpointError(f"{self.uri}/{info.file}: short read of '{info.name}'")
            done += n

    def _fd(self, file: str) -> int:
        """The open file behind local reads of ``file``: the file whose header was read, or an
        error (it was replaced or changed in between)."""
        with self._lock:
            if file not in self._fds:
                fd = os.open(self.file_path(file), os.O_RDONLY)
                if self._stamps.get(file) not in (None, local_stamp(os.fstat(fd))):
                    os.close(fd)
                    raise CheckpointError(self._changed(file))
                self._fds[file] = fd
            return self._fds[file]

    def stored_parts(self) -> list[Checkpoint]:
        """The checkpoints whose files this one reads from storage: itself for a plain one
        (an adapter over its base, a stacked input: the checkpoints under them)."""
        return [self]

    def check_unchanged(self) -> None:
        """Raise unless every weight file read still holds what it held when this checkpoint
        was opened (a file rewritten during a merge would leave a model mixing two versions,
        recorded under the old one's hash). Locally the open files are checked, so a file
        replaced by a new one (a rename) is fine: reads kept the old one (files this process
        never read, as under Ray, are checked by path); on a store, the object's tag. A store
        that reports no tag cannot be checked."""
        for file, stamp in self._stamps.items():
            if stamp is None:
                continue
            path = self.file_path(file)
            if storage.is_local(self.fs):
                with self._lock:
                    fd = self._fds.get(file)
                    if fd is not None:
                        now = local_stamp(os.fstat(fd))
                if fd is None:  # read elsewhere (Ray workers) if at all: by its path
                    now = local_stamp(os.stat(path)) if os.path.exists(path) else "gone"
            else:
                self.fs.invalidate_cache(path)
                with storage.store_errors(storage.full_uri(self.fs, path)):
                    now = stamp_of(self.fs, self.fs.info(path))
            if now != stamp:
                raise CheckpointError(self._changed(file))

    def _changed(self, file: str) -> str:
        return (
            f"{self.uri}/{file}: changed since it was opened (rewritten while being read?); "
            "nothing was written"
        )

    def side_files(self) -> list[str]:
        """Config, tokenizer and sentence-transformers files next to the weights (copied into
        merged outputs)."""
        if self.kind == "file":
            return []
        names = [*SIDE_FILES, *SENTENCE_TRANSFORMERS_FILES]
        found = [f for f in names if self.fs.exists(storage.join(self.root, f))]
        if "modules.json" in found:
            modules = json.loads(self.fs.cat_file(storage.join(self.root, "modules.json")))
            folders = [m.get("path") or "" for m in modules]
            # a module folder is a plain name beside the weights (never "..", never absolute)
            configs = [
                f"{d}/config.json"
                for d in folders
                if PurePosixPath(d).name == d and d not in ("", ".", "..")
            ]
            found += [f for f in configs if self.fs.exists(storage.join(self.root, f))]
        return found

    def content_hash(self) -> str:
        """sha256 over each weight file's name and sha256, in file order (cached on disk); an
        adapter's config too, since its scales and patterns change the model it makes, and a
        Twin-Merging folder's ``twin.json`` (its content key stands for the factors and router
        that change the model per input)."""
        config = ["twin.json"] if self.kind != "adapter" else ["adapter_config.json"]
        config = [f for f in config if self.fs.exists(storage.join(self.root, f))]
        return file_set_hash(self.fs, self.root, [*self.files, *config])

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        self._ranges.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.uri!r}, {len(self.tensors)} tensors, {self.nbytes} bytes)"

    def __getstate__(self) -> dict:
        raise TypeError("Checkpoint is not picklable: pass its URI to workers instead")


def file_stamp(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """What changes whenever the file's content does: inode, mtime (ns) and size locally; on a
    store its ETag, or the content hash or blob id it reports (hf://), with the size. None
    when the store reports none of these: such a file is hashed every time, never cached."""
    if storage.is_local(fs):
        return local_stamp(os.stat(path))
    return stamp_of(fs, fs.info(path))


def local_stamp(st: os.stat_result) -> str:
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def stamp_of(fs: fsspec.AbstractFileSystem, info: dict[str, Any]) -> str | None:
    """:func:`file_stamp` from the file's ``fs.info``."""
    if storage.is_local(fs):
        return local_stamp(os.stat(info["name"]))
    lfs = info.get("lfs") if isinstance(info.get("lfs"), dict) else {}
    tag = info.get("ETag") or info.get("etag") or lfs.get("sha256") or info.get("blob_id")
    return f"{tag}:{info.get('size')}" if tag else None


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """sha256 (hex) of one file, streamed in 16 MB reads; on a store, the bytes read must add
    up to the size it reported."""
    h = hashlib.sha256()
    n = 0
    with storage.store_errors(storage.full_uri(fs, path)), fs.open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
            n += len(chunk)
        expected = getattr(fh, "size", None)
    if not storage.is_local(fs) and expected is not None and n != expected:
        raise OSError(f"{storage.full_uri(fs, path)}: read {n} of its {expected} bytes")
    return h.hexdigest()


def _hash_cache(fs: fsspec.AbstractFileSystem, path: str, stamp: str) -> Path:
    key = hashlib.sha256(f"{fs.protocol}\0{path}\0{stamp}".encode()).hexdigest()
    return storage.amalgam_home() / "hashes" / key


def remember_hash(fs: fsspec.AbstractFileSystem, path: str, digest: str) -> None:
    """Cache ``digest`` as the sha256 of the file at ``path`` as it is now (a writer that
    hashed what it wrote saves the next reader a full read); nothing where the store reports
    no stamp."""
    stamp = file_stamp(fs, path)
    if stamp is None:
        return
    cached = _hash_cache(fs, path, stamp)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_text(digest)
    tmp.replace(cached)  # atomic: concurrent writers agree on the content


def file_hash(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """sha256 of one file, streamed once and then cached on disk under ``$AMALGAM_HOME/hashes``
    by (store, path, :func:`file_stamp`)."""
    stamp = file_stamp(fs, path)
    if stamp is not None and (cached := _hash_cache(fs, path, stamp)).is_file():
        return cached.read_text()
    digest = sha256_file(fs, path)
    remember_hash(fs, path, digest)
    return digest


def file_set_hash(fs: fsspec.AbstractFileSystem, root: str, files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f}\0{file_hash(fs, storage.join(root, f))}\n".encode())
    return "sha256:" + h.hexdigest()


def amalgam_marks(metadata: dict[str, str]) -> bool:
    """True when a shard's safetensors metadata says amalgam wrote it (merge, decompression,
    compression)."""
    return (
        "amalgam_version" in metadata
        or "amalgam.decompressed_from" in metadata
        or metadata.get("format") == "amalgam-compeft"
    )


def written_by_amalgam(fs: fsspec.AbstractFileSystem, folder: str, names: Collection[str]) -> bool:
    """True when the first shard (by name) among ``names`` in ``folder`` carries amalgam's
    marks; only its header is read (False when it cannot be read)."""
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    if not shards:
        return False
    path = storage.join(folder, shards[0])
    try:
        with storage.store_errors(path), fs.open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if 0 < n <= MAX_HEADER_BYTES else {}
    except (OSError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and amalgam_marks(meta)


def unfinished_commit(fs: fsspec.AbstractFileSystem, folder: str, names: Collection[str]) -> bool:
    """True for a folder on an object store that amalgam was writing (its shards carry
    amalgam's marks) and whose commit record is not there: not a finished model."""
    return (
        not storage.is_local(fs)
        and COMMIT_RECORD not in names
        and written_by_amalgam(fs, folder, names)
    )


def open_checkpoint(uri: str, *, allow_pickle: bool = False, **storage_options: Any) -> Checkpoint:
    """Open a checkpoint lazily; only headers (and config.json) are read."""
    return Checkpoint(uri, allow_pickle=allow_pickle, **storage_options)
