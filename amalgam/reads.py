"""Byte reads for checkpoints: zero-copy views on memory-mapped local files, unmapped with the
view, and a store's byte ranges fetched as large ranged requests in parallel."""

from __future__ import annotations

import mmap
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

#: Local tensors smaller than this are read with ``preadv`` into a fresh buffer, which costs
#: less than a mapping's two system calls and page faults for them.
MAP_MIN_BYTES = 1 << 20
#: The largest ranged request to a store (and the read-ahead of sequential reads).
RANGE_BYTES = 8 << 20
#: Ranged requests running at once, over every file and thread of the process; one read has
#: at most this many requests running or waiting to be copied. Bytes buffered beyond the
#: tensors being filled: those requests' and the read-ahead (two spans per file read in order).
RANGES_IN_FLIGHT = 8

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def range_pool() -> ThreadPoolExecutor:
    """The process's pool of ranged-request threads (created on first use; shared, so that the
    number of requests in flight stays bounded whatever the number of inputs and readers)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(RANGES_IN_FLIGHT, thread_name_prefix="amalgam-range")
        return _pool


class RangeReader:
    """Byte ranges of a store's files, read as ranged requests of at most :data:`RANGE_BYTES`,
    up to :data:`RANGES_IN_FLIGHT` per read (and in the process: the shared
    :func:`range_pool`), each copied into the caller's buffer as it arrives.

    A read that starts where the previous read of the same file ended (tensors read in file
    order) reads ahead: its last request is a full :data:`RANGE_BYTES` and the next such span
    is requested too; both are kept for the next reads (at most 2 x :data:`RANGE_BYTES` per
    file), so that small neighbouring tensors share requests instead of paying one each, and
    the next bytes are on their way while these are used. Any other read (the first of a
    file, a jump) requests exactly its bytes. ``cat(path, a, b)`` returns bytes ``[a, b)`` exactly.
    """

    def __init__(self, cat: Callable[[str, int, int], bytes]):
        self._cat = cat
        self._lock = threading.Lock()
        self._ends: dict[str, int] = {}  # where the last read of each file ended
        self._ahead: dict[str, list[tuple[int, int, Future[bytes]]]] = {}  # spans, by file

    def read(self, path: str, size: int, start: int, end: int, out: torch.Tensor) -> None:
        """Fill the uint8 tensor ``out`` with bytes ``[start, end)`` of ``path`` (of ``size``
        bytes)."""
        with self._lock:  # planned whole, so that a concurrent read of the next tensor sees it
            spans = self._ahead.get(path, [])
            sequential = self._ends.get(path) == start
            self._ends[path] = end
            ready: list[tuple[int, Future[bytes]]] = []
            at = start
            for a, b, fut in spans:  # contiguous, in file order
                if a <= at < b:
                    ready.append((a, fut))
                    at, sequential = b, True
            pieces = [(a, min(a + RANGE_BYTES, end)) for a in range(at, end, RANGE_BYTES)]
            tail = None
            if sequential:
                spans = [s for s in spans if s[1] > end]
                if pieces and end < size:  # the last request reads ahead
                    a = pieces.pop()[0]
                    spans.append(self._span(path, a, size))
                    tail = (a, spans[-1][2])
                nxt = spans[-1][1] if spans else end
                if nxt < size and nxt - end < RANGE_BYTES:  # and the next span is on its way
                    spans.append(self._span(path, nxt, size))
                self._ahead[path] = spans
        dest = out.numpy()
        pending: deque[tuple[int, Future[bytes]]] = deque(ready)
        try:
            for a, b in pieces:
                pending.append((a, range_pool().submit(self._cat, path, a, b)))
                if len(pending) >= RANGES_IN_FLIGHT:
                    self._copy(*pending.popleft(), start, end, dest)
            pending.extend([tail] if tail else [])
            while pending:
                self._copy(*pending.popleft(), start, end, dest)
        except BaseException:
            with self._lock:  # a failed read-ahead is not kept for the next read
                self._ahead.pop(path, None)
            raise

    def _span(self, path: str, a: int, size: int) -> tuple[int, int, Future[bytes]]:
        b = min(a + RANGE_BYTES, size)
        return a, b, range_pool().submit(self._cat, path, a, b)

    @staticmethod
    def _copy(a: int, fut: Future[bytes], start: int, end: int, dest: np.ndarray) -> None:
        block = fut.result()
        lo, hi = max(start, a), min(end, a + len(block))
        if hi > lo:
            dest[lo - start : hi - start] = np.frombuffer(block, dtype=np.uint8)[lo - a : hi - a]

    def clear(self) -> None:
        with self._lock:
            self._ends.clear()
            self._ahead.clear()


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
