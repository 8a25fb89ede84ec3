"""DARE's keep decision inside a kernel: the lanes of ``counter_random`` in uint64 arithmetic.

Entry i of stream ``key`` draws the low 31 bits of the (i % 2)-th 32-bit half of SplitMix64's
output at counter i // 2, exactly as ``counter_random.CounterStream.lanes`` does with torch
int64 ops; the entry is kept when its lane is below the cutoff (``sparsify.RandomDrop``).
The words are hashed in one loop and the keep decisions taken in another, so LLVM vectorises
both (the uint64 multiplies with AVX-512's ``vpmullq``, or emulated on AVX2).
"""

from __future__ import annotations

import numpy as np
from numba import njit

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
M1 = np.uint64(0xBF58476D1CE4E5B9)
M2 = np.uint64(0x94D049BB133111EB)
S30, S27, S31 = np.uint64(30), np.uint64(27), np.uint64(31)
HALF31 = np.uint32(0x7FFFFFFF)
ONE = np.uint64(1)


@njit(nogil=True, cache=True, inline="always")
def splitmix64(key: np.uint64, counter: np.uint64) -> np.uint64:
    """SplitMix64's output for ``counter`` (0-based) of stream ``key`` (wrapping uint64)."""
    z = key + (counter + ONE) * GOLDEN
    z = (z ^ (z >> S30)) * M1
    z = (z ^ (z >> S27)) * M2
    return z ^ (z >> S31)


@njit(nogil=True, cache=True, inline="always")
def draw(key: np.uint64, start: np.int64, n: np.int64, words: np.ndarray) -> np.ndarray:
    """The 32-bit halves (uint32) of entries start .. start + n - 1: SplitMix64's words at
    counters start // 2 onwards written to ``words`` (at least n // 2 + 1 long) in one
    vectorisable loop, viewed as uint32 (little-endian: entry 2c takes the low half of word c,
    entry 2c + 1 its high half). A lane is a half's low 31 bits."""
    first, offset = np.uint64(start >> 1), start & 1
    count = (offset + n + 1) >> 1
    for k in range(count):
        words[k] = splitmix64(key, first + np.uint64(k))
    return words[:count].view(np.uint32)[offset : offset + n]


@njit(nogil=True, cache=True, inline="always")
def kept(half: np.uint32, cutoff: np.int64) -> bool:
    """cutoff - lane > 0 for the lane (low 31 bits) of ``half``, in the int32 arithmetic of the
    torch path (wrapping at 2^31; ``& (2^32 - 1)`` is Python's ``% 2^32``, without a branch)."""
    diff = (cutoff - np.int64(half & HALF31) + (1 << 31)) & ((1 << 32) - 1)
    return diff - (1 << 31) > 0
