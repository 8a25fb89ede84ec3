"""Exact k-th largest magnitude of a task vector, fused with the delta (radix selection, numba).

|x - base| is computed in float32 straight from the stored dtype (bf16 bits, fp16 bits, float32),
as ``torch.sub(x, base.float()).abs()`` would, and never stored: non-negative float32 values
order like their bit patterns, so one parallel pass histograms the high 16 bits of each
magnitude, and a second pass over the same inputs histograms the low 16 bits of the entries in
the bin that holds the answer. Histograms are per thread and summed (integers: the result does
not depend on the thread count). The value equals ``sparsify.kth_largest`` on the float32
magnitudes bit for bit. CPU tensors only; no fastmath, so every float op is IEEE.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.extending import intrinsic, overload

BINS = 1 << 16
PART = 1 << 30  # at most this many entries per per-thread histogram (int32 counts)


def supported(*tensors: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors (CPU; bf16, fp16 or float32)."""
    return all(
        t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16, torch.float32)
        for t in tensors
    )


def kth_largest_magnitude(x: torch.Tensor, k: int, base: torch.Tensor | None = None) -> float:
    """The exact k-th largest of |x - base| (|x| without ``base``) in float32, 1 <= k <= numel."""
    xa, ba = _arrays(x, base)
    if not 1 <= k <= xa.size:
        raise ValueError(f"k={k} outside 1..{xa.size}")
    bits = _kth_largest_bits(xa, ba, k, get_num_threads())
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def magnitude_histogram(
    x: torch.Tensor, base: torch.Tensor | None = None, high: int = -1
) -> torch.Tensor:
    """Counts (int64, 65536 bins) of the high 16 bits of |x - base|'s float32 bits; with
    ``high`` >= 0, of the low 16 bits of the entries whose high 16 bits equal ``high``."""
    xa, ba = _arrays(x, base)
    threads = get_num_threads()
    counts = _high_counts(xa, ba, threads) if high < 0 else _low_counts(xa, ba, high, threads)
    return torch.from_numpy(counts)


def _arrays(x: torch.Tensor, base: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Flat numpy views: float32 as is, bf16 bits as uint16, fp16 bits as int16."""
    if base is not None and base.shape != x.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs base {tuple(base.shape)}")
    if not supported(x) or (base is not None and not supported(base)):
        raise ValueError("the selection kernel takes CPU bf16, fp16 or float32 tensors")
    return _flat(x), None if base is None else _flat(base)


def _flat(t: torch.Tensor) -> np.ndarray:
    flat = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float16:
        return flat.view(torch.int16).numpy()
    return flat.numpy()


@intrinsic
def _as_float(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits``."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _as_bits(typingctx, value):
    """The int32 bit pattern of the float32 ``value``."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@njit
def _half_to_float(h):
    """IEEE fp16 bits (0..65535) to float32, exactly (NaNs quieted, as x86's F16C does)."""
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    man = h & 0x3FF
    if exp == 0x1F:
        return _as_float(np.int32(sign | 0x7F800000 | (man << 13) | (0x400000 if man else 0)))
    if exp:
        return _as_float(np.int32(sign | ((exp + 112) << 23) | (man << 13)))
    # zero or subnormal: man * 2^-24, exact in float32
    value = np.float32(man) * np.float32(2.0**-24)
    return -value if sign else value


def _load(a, i):
    """Entry i of a flat array as float32 (uint16 arrays hold bf16 bits, int16 ones fp16 bits)."""


@overload(_load)
def _load_impl(a, i):
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    if a.dtype == types.uint16:
        return lambda a, i: _as_float(np.int32(a[i]) << 16)
    return lambda a, i: _half_to_float(np.int32(a[i]) & 0xFFFF)


@njit
def _magnitude(x, base, i):
    """The float32 bits of |x[i] - base[i]| (|x[i]| without base): a non-negative int32."""
    v = _load(x, i) if base is None else _load(x, i) - _load(base, i)
    return _as_bits(v) & 0x7FFFFFFF


@njit(cache=True)
def _parts(n, threads):
    """Contiguous ranges, one per thread (and at most PART entries each: int32 counts)."""
    parts = max(threads, (n + PART - 1) // PART)
    return parts, np.zeros((parts, BINS), np.int32)


@njit(parallel=True, cache=True)
def _high_counts(x, base, threads):
    n = x.size
    parts, counts = _parts(n, threads)
    for p in prange(parts):
        mine = counts[p]
        for i in range(n * p // parts, n * (p + 1) // parts):
            mine[_magnitude(x, base, i) >> 16] += 1
    return counts.sum(axis=0).astype(np.int64)


@njit(parallel=True, cache=True)
def _low_counts(x, base, high, threads):
    n = x.size
    parts, counts = _parts(n, threads)
    for p in prange(parts):
        mine = counts[p]
        for i in range(n * p // parts, n * (p + 1) // parts):
            m = _magnitude(x, base, i)
            if m >> 16 == high:
                mine[m & 0xFFFF] += 1
    return counts.sum(axis=0).astype(np.int64)


@njit(cache=True)
def _top_bin(hist, k):
    """The bin holding the k-th largest entry, and the count in higher bins."""
    above = 0
    for b in range(BINS - 1, -1, -1):
        if above + hist[b] >= k:
            return b, above
        above += hist[b]
    return 0, above


@njit(cache=True)
def _kth_largest_bits(x, base, k, threads):
    high, above = _top_bin(_high_counts(x, base, threads), k)
    low, _ = _top_bin(_low_counts(x, base, high, threads), k - above)
    return (high << 16) | low
