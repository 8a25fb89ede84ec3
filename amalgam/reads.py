"""Byte reads for checkpoints: zero-copy views on memory-mapped local files, unmapped with the
view, and a store's byte ranges fetched as large ranged requests in parallel."""

from __future__ import annotations

import mmap
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

#: Local tensors smaller than this are read with ``preadv`` into a fresh buffer, which costs
#: less than a mapping's two system calls and page faults for them.
MAP_MIN_BYTES = 1 << 20
#: One ranged request to a store: an aligned block of the file.
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


class RangeReader:
    """Byte ranges of one store's files, read as ranged requests of whole aligned blocks of
    :data:`RANGE_BYTES`, up to :data:`RANGES_IN_FLIGHT` per read and in the process (the
    shared :func:`range_pool`), each copied into the caller's buffer as it arrives.

    A block that a read covers only in part (its first or last) is kept, at most
    ``keep_blocks`` of them, most recent first: the neighbouring tensors of the same file,
    read next, come from it without a request of their own, so small tensors cost one request
    per block instead of one each. ``cat(path, a, b)`` returns bytes ``[a, b)`` exactly.
    """

    def __init__(self, cat: Callable[[str, int, int], bytes], keep_blocks: int = 2):
        self._cat = cat
        self._keep = keep_blocks
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple[str, int], Future[bytes]] = OrderedDict()

    def read(self, path: str, size: int, start: int, end: int, out: torch.Tensor) -> None:
        """Fill the uint8 tensor ``out`` with bytes ``[start, end)`` of ``path`` (of ``size``
        bytes)."""
        dest = out.numpy()
        first, last = start // RANGE_BYTES, (end - 1) // RANGE_BYTES
        pending: deque[tuple[int, Future[bytes]]] = deque()
        for k in range(first, last + 1):
            pending.append((k, self._block(path, size, k, partial=k in (first, last))))
            if len(pending) >= RANGES_IN_FLIGHT:
                self._copy(*pending.popleft(), start, end, dest)
        while pending:
            self._copy(*pending.popleft(), start, end, dest)

    def _block(self, path: str, size: int, k: int, partial: bool) -> Future[bytes]:
        a, b = k * RANGE_BYTES, min((k + 1) * RANGE_BYTES, size)
        if not partial:
            return range_pool().submit(self._cat, path, a, b)
        with self._lock:
            fut = self._kept.get((path, k))
            if fut is None:
                fut = range_pool().submit(self._cat, path, a, b)
                self._kept[(path, k)] = fut
                while len(self._kept) > self._keep:
                    self._kept.popitem(last=False)
            return fut

    @staticmethod
    def _copy(k: int, fut: Future[bytes], start: int, end: int, dest: np.ndarray) -> None:
        block = fut.result()
        a = k * RANGE_BYTES
        lo, hi = max(start, a), min(end, a + len(block))
        dest[lo - start : hi - start] = np.frombuffer(block, dtype=np.uint8)[lo - a : hi - a]

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()


def mapped(fd: int, start: int, end: int) -> torch.Tensor:
    """Bytes ``[start, end)`` of the open file ``fd`` as a uint8 tensor on a mapping of its own
    (private, copy-on-write: no copy out of the page cache, and writing to the tensor never
    changes the file nor any other read of it). The mapping lives exactly as long as the
    tensor: its pages leave the process when the last reference to the tensor is dropped, so
    memory stays bounded however many tensors are read, and no released memory can be read."""
    offset = start - start % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(fd, end - offset, access=mmap.ACCESS_COPY, offset=offset)
    array = np.frombuffer(mapping, dtype=np.uint8, count=end - start, offset=start - offset)
    return torch.from_numpy(array)  # holds the array, which holds the mapping
