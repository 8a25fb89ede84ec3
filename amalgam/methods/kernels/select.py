"""Exact k-th largest magnitude of a task vector, fused with the delta: one pass, else two.

The kernels of ``blocks`` compute |x - base| in float32 straight from the stored dtypes, as
``torch.sub(x, base.float()).abs()`` would, and never store it: non-negative float32 values
order like their bit patterns, so the selection works on those bits.

One pass (``one_pass``, tensors of at least ``MIN_ENTRIES``): a fixed sample of ``RUNS`` runs
of ``RUN`` contiguous entries spread over the tensor gives a bracket lo <= hi, ``SPREAD``
standard deviations of the sample's rank around k (the deviation estimated from the spread of
the runs' counts, so correlated neighbours widen it); one pass counts the entries above hi,
equal to hi, equal to lo, and gathers the few strictly between into a buffer per range (sized
from the sample), whose order statistic (``np.partition``) is the answer when the counts show
it lies in the bracket. Otherwise (the sample missed; more entries fell between than the
buffers hold; or the sample put more than ``MAX_SHARE`` of the entries between, where
partitioning them would cost more than a second pass) the two-pass radix
selection runs (``two_pass``): a histogram of the high 16 bits of each magnitude, then of the
low 16 bits of the entries in the bin that holds the answer (``top_bin`` picks the bins).
The sample decides only the speed: the value is the same either way.

Each pass runs over contiguous ranges on ``launch``'s threads; the counts are summed and the
gathered entries pooled, so the value does not depend on the thread count. It equals
``torch.kthvalue`` on the float32 magnitudes bit for bit. CPU tensors only; no fastmath, so
every float op is IEEE.
"""

from __future__ import annotations

import math
from types import ModuleType

import numpy as np
import torch

from amalgam.methods.kernels import launch

RUNS, RUN = 4096, 16  # the sample: RUNS runs of RUN contiguous entries (64K magnitudes)
MIN_ENTRIES = 1 << 19  # smaller tensors take the two passes: a sample would cost as much
SPREAD = 4.0  # the bracket's half-width in standard deviations (a miss costs only time)
MAX_SHARE = 1 / 32  # of the sample between the bracket's ends, above which two passes cost less
OPEN = 0xFFFFFFFF  # an upper bound above every magnitude's bits (they have no sign bit)
GOLDEN = 0.6180339887498949  # the runs' offsets within their strides: no column aligns them


def supported(*tensors: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors (CPU; bf16, fp16 or float32) and may run."""
    return all(launch.takes(t) for t in tensors) and launch.enabled()


def kth_largest_magnitude(x: torch.Tensor, k: int, base: torch.Tensor | None = None) -> float:
    """The exact k-th largest of |x - base| (|x| without ``base``) in float32, 1 <= k <= numel."""
    if not 1 <= k <= x.numel():
        raise ValueError(f"k={k} outside 1..{x.numel()}")
    blocks, xs, bs = entries(x, base)
    found = one_pass(blocks, xs, bs, k) if xs.size >= MIN_ENTRIES else None
    return as_float(two_pass(x, base, k) if found is None else found)


def two_pass(x: torch.Tensor, base: torch.Tensor | None, k: int) -> int:
    """The bits of the k-th largest magnitude by radix selection (two histogram passes)."""
    high, above = top_bin(magnitude_histogram(x, base), k)
    low, _ = top_bin(magnitude_histogram(x, base, high), k - above)
    return (high << 16) | low


def one_pass(blocks: ModuleType, xs: np.ndarray, bs: np.ndarray | None, k: int) -> int | None:
    """The bits of the k-th largest magnitude from one pass around a sampled bracket, or None
    where the bracket does not hold it (or holds more entries than it has room for)."""
    sample = np.empty((RUNS, RUN), np.uint32)
    blocks.magnitude_sample(xs, bs, sample_starts(xs.size), sample)
    lo, hi = bracket(sample, k / xs.size)
    share = np.count_nonzero((sample > lo) & (sample < hi)) / sample.size
    if share > MAX_SHARE:  # a wide bracket: partitioning its entries would cost more than a pass
        return None
    room = 2 * share + 1 / 64  # of each range, for the entries between
    counts: dict[int, tuple[int, int, int, int]] = {}
    inside: dict[int, np.ndarray] = {}

    def count(start: int, stop: int) -> None:
        buffer = np.empty(int((stop - start) * room) + blocks.BLOCK, np.uint32)
        counts[start] = blocks.bracket_counts(
            xs, bs, np.uint32(lo), np.uint32(hi), start, stop, buffer
        )
        inside[start] = buffer[: max(counts[start][3], 0)]

    launch.run_ranges(count, xs.size)
    if any(c[3] < 0 for c in counts.values()):
        return None
    above, at_hi, at_lo, between = (sum(c[i] for c in counts.values()) for i in range(4))
    rank = k - above  # of the answer among the entries at or below hi
    if 1 <= rank <= at_hi:
        return hi
    rank -= at_hi
    if 1 <= rank <= between:
        pooled = np.concatenate([inside[s] for s in sorted(inside)])
        return int(np.partition(pooled, between - rank)[between - rank])
    rank -= between
    return lo if lo < hi and 1 <= rank <= at_lo else None


def sample_starts(n: int) -> np.ndarray:
    """The first entries of the sample's runs: one run in each of ``RUNS`` equal strides of
    n >= RUNS * RUN entries, at a golden-ratio offset within it (so that no row length aligns
    every run on the same columns)."""
    stride = n // RUNS
    offsets = (np.arange(RUNS) * GOLDEN % 1.0 * (stride - RUN)).astype(np.int64)
    return np.arange(RUNS, dtype=np.int64) * stride + offsets


def bracket(sample: np.ndarray, fraction: float) -> tuple[int, int]:
    """Bits lo <= hi likely to hold the magnitude with ``fraction`` of all entries at or above
    it, from a sample of runs (rows): its rank in the sample, plus and minus ``SPREAD``
    standard deviations. The deviation is the largest of the binomial one, the one the runs'
    own counts show (runs of correlated neighbours vary more than single entries) and one
    entry (near the extremes the binomial one vanishes; the sample's extremes bound nothing)."""
    flat = sample.reshape(-1)
    size = flat.size
    rank = fraction * size  # expected entries of the sample at or above the answer
    guess = np.partition(flat, size - max(1, round(rank)))[size - max(1, round(rank))]
    per_run = np.count_nonzero(sample >= guess, axis=1)
    binomial = size * fraction * (1 - fraction)
    deviation = math.sqrt(max(binomial, sample.shape[0] * per_run.var(), 1.0))
    top, bottom = math.floor(rank - SPREAD * deviation), math.ceil(rank + SPREAD * deviation)
    wanted = [size - i for i in (top, bottom) if 1 <= i <= size]
    ordered = np.partition(flat, wanted) if wanted else flat
    hi = int(ordered[size - top]) if top >= 1 else OPEN
    lo = int(ordered[size - bottom]) if bottom <= size else 0
    return lo, hi


def as_float(bits: int) -> float:
    """The float32 with these bits, as a Python float."""
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def entries(
    x: torch.Tensor, base: torch.Tensor | None
) -> tuple[ModuleType, np.ndarray, np.ndarray | None]:
    """The compiled kernels and flat views of ``x`` and ``base``, or one clear error."""
    if base is not None and base.shape != x.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs base {tuple(base.shape)}")
    if not all(launch.takes(t) for t in (x, base) if t is not None):
        raise ValueError("the selection kernel takes CPU bf16, fp16 or float32 tensors")
    blocks = launch.compiled()
    if blocks is None:
        raise RuntimeError("the selection kernel cannot load (numba): see the warning logged")
    return blocks, launch.entries(x), None if base is None else launch.entries(base)


def magnitude_histogram(
    x: torch.Tensor, base: torch.Tensor | None = None, high: int = -1
) -> torch.Tensor:
    """Counts (int64, 65536 bins) of the high 16 bits of |x - base|'s float32 bits; with
    ``high`` >= 0, of the low 16 bits of the entries whose high 16 bits equal ``high``."""
    blocks, xs, bs = entries(x, base)
    parts: dict[int, np.ndarray] = {}  # range start -> that range's counts

    def count(start: int, stop: int) -> None:
        parts[start] = blocks.magnitude_counts(xs, bs, high, start, stop)

    launch.run_ranges(count, xs.size)
    return torch.from_numpy(sum(parts[s] for s in sorted(parts)))


def top_bin(hist: torch.Tensor | np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry of a histogram, and the count in higher bins
    (in numpy on the host: a few microseconds, where torch's ops cost far more per call)."""
    counts = hist.cpu().numpy() if isinstance(hist, torch.Tensor) else hist
    from_top = np.cumsum(counts[::-1], dtype=np.int64)
    idx = int(np.searchsorted(from_top, k))
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return counts.size - 1 - idx, above
