"""DARE's keep decision inside a kernel: the lanes of ``counter_random`` in uint64 arithmetic.

Entry i of stream ``key`` draws the low 31 bits of the (i % 2)-th 32-bit half of SplitMix64's
output at counter i // 2, exactly as ``counter_random.CounterStream.lanes`` does with torch
int64 ops; the entry is kept when its lane is below the cutoff (``sparsify.RandomDrop``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
M1 = np.uint64(0xBF58476D1CE4E5B9)
M2 = np.uint64(0x94D049BB133111EB)
S30, S27, S31, S32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)
LOW31 = np.uint64(0x7FFFFFFF)
ONE = np.uint64(1)


@njit(nogil=True, cache=True, inline="always")
def splitmix64(key: np.uint64, counter: np.uint64) -> np.uint64:
    """SplitMix64's output for ``counter`` (0-based) of stream ``key`` (wrapping uint64)."""
    z = key + (counter + ONE) * GOLDEN
    z = (z ^ (z >> S30)) * M1
    z = (z ^ (z >> S27)) * M2
    return z ^ (z >> S31)


@njit(nogil=True, cache=True, inline="always")
def lane(word: np.uint64, index: np.int64) -> np.int64:
    """Entry ``index``'s 31-bit lane from the word at counter index // 2."""
    half = word >> S32 if index & 1 else word
    return np.int64(half & LOW31)


@njit(nogil=True, cache=True, inline="always")
def fill_lanes(key: np.uint64, start: np.int64, lanes: np.ndarray) -> None:
    """lanes[j] = the lane of entry start + j: one hash per pair of entries."""
    n, j = len(lanes), 0
    if start & 1:  # an odd start: the high half of the first word
        lanes[0] = lane(splitmix64(key, np.uint64(start >> 1)), start)
        j = 1
    first = np.uint64((start + j) >> 1)
    for k in range((n - j) // 2):
        word = splitmix64(key, first + np.uint64(k))
        lanes[j + 2 * k] = np.int64(word & LOW31)
        lanes[j + 2 * k + 1] = np.int64((word >> S32) & LOW31)
    if (n - j) & 1:  # an odd end: the low half of the last word
        lanes[n - 1] = lane(splitmix64(key, np.uint64((start + n - 1) >> 1)), start + n - 1)


@njit(nogil=True, cache=True, inline="always")
def kept(lane_value: np.int64, cutoff: np.int64) -> bool:
    """cutoff - lane > 0, in the int32 arithmetic of the torch path (wrapping at 2^31)."""
    diff = (cutoff - lane_value + (1 << 31)) % (1 << 32) - (1 << 31)
    return diff > 0
