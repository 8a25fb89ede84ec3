"""Byte reads for checkpoints: zero-copy views on memory-mapped local files, with their pages
released after use, and a store's byte range fetched as large ranged requests in parallel."""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

#: Local tensors smaller than this are read with ``preadv`` into a fresh buffer: mapping them
#: saves no measurable time, and a page shared with a neighbour could not be released.
MAP_MIN_BYTES = 1 << 20
#: One ranged request to a store; a tensor's range is split into requests of this size.
RANGE_BYTES = 8 << 20
#: Ranged requests in flight at once, over every file and thread of the process (so at most
#: ``RANGES_IN_FLIGHT * RANGE_BYTES`` bytes are buffered beyond the tensors being filled).
RANGES_IN_FLIGHT = 8

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def range_pool() -> ThreadPoolExecutor:
    """The process's pool of ranged-request threads (created on first use; shared, so that the
    number of requests in flight stays bounded whatever the number of inputs and readers)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(RANGES_IN_FLIGHT, thread_name_prefix="amalgam-range")
        return _pool


def fetch_range(cat: Callable[[int, int], bytes], start: int, end: int, out: torch.Tensor) -> None:
    """Fill the uint8 tensor ``out`` with bytes ``[start, end)`` of a file on a store, read as
    ranged requests of at most :data:`RANGE_BYTES` (``cat(a, b)`` returns bytes ``[a, b)``
    exactly), several in flight; each lands in ``out`` as it arrives."""
    dest = out.numpy()

    def one(a: int) -> None:
        b = min(a + RANGE_BYTES, end)
        dest[a - start : b - start] = np.frombuffer(cat(a, b), dtype=np.uint8)

    starts = range(start, end, RANGE_BYTES)
    if len(starts) == 1:
        one(start)
        return
    for _ in range_pool().map(one, starts):  # re-raises the first failure
        pass


class FileMaps:
    """Read-only, copy-on-write memory maps of a checkpoint's local files, opened on first use.

    :meth:`view` hands out a tensor on the mapped bytes (no copy); the view holds the mapping
    open (a buffer export), so closing never unmaps memory a live view points into. Writes to a
    view change private pages only, never the file. :meth:`release` drops a range's pages from
    the process (``madvise(MADV_DONTNEED)``): the process's memory then stays bounded however
    many tensors were read. Only pages entirely inside the range are dropped, so a neighbouring
    tensor is never touched; a view read after its release sees the stored bytes again (its
    pages are read back from the file), so a release can never expose wrong bytes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[str, mmap.mmap] = {}

    def _map(self, path: str) -> mmap.mmap:
        with self._lock:
            if path not in self._maps:
                fd = os.open(path, os.O_RDONLY)
                try:
                    self._maps[path] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                finally:
                    os.close(fd)
            return self._maps[path]

    def view(self, path: str, start: int, end: int) -> torch.Tensor:
        """Bytes ``[start, end)`` of the file at ``path`` as a uint8 tensor on its mapping."""
        array = np.frombuffer(self._map(path), dtype=np.uint8, count=end - start, offset=start)
        return torch.from_numpy(array)

    def release(self, path: str, start: int, end: int) -> None:
        """Drop the pages inside bytes ``[start, end)`` of ``path`` from this process."""
        with self._lock:
            mapping = self._maps.get(path)
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if mapping is not None and last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        """Unmap every file no view points into; a mapping with live views is left to be
        unmapped when its last view is gone."""
        with self._lock:
            maps, self._maps = list(self._maps.values()), {}
        for mapping in maps:
            with contextlib.suppress(BufferError):  # live views: unmapped with them
                mapping.close()
