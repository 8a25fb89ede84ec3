"""Exact k-th largest magnitude of a task vector, fused with the delta (radix selection).

``blocks.magnitude_counts`` computes |x - base| in float32 straight from the stored dtypes, as
``torch.sub(x, base.float()).abs()`` would, and never stores it: non-negative float32 values
order like their bit patterns, so one pass histograms the high 16 bits of each magnitude and a
second pass over the same inputs the low 16 bits of the entries in the bin that holds the
answer (``top_bin`` picks the bins). Each pass runs over contiguous ranges on
``launch``'s threads, one integer histogram per range, summed: the counts, and so the value,
do not depend on the thread count. The value equals ``torch.kthvalue`` on the float32
magnitudes bit for bit. CPU tensors only; no fastmath, so every float op is IEEE.
"""

from __future__ import annotations

import numpy as np
import torch

from amalgam.methods.kernels import launch


def supported(*tensors: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors (CPU; bf16, fp16 or float32) and may run."""
    return all(launch.takes(t) for t in tensors) and launch.enabled()


def kth_largest_magnitude(x: torch.Tensor, k: int, base: torch.Tensor | None = None) -> float:
    """The exact k-th largest of |x - base| (|x| without ``base``) in float32, 1 <= k <= numel."""
    if not 1 <= k <= x.numel():
        raise ValueError(f"k={k} outside 1..{x.numel()}")
    high, above = top_bin(magnitude_histogram(x, base), k)
    low, _ = top_bin(magnitude_histogram(x, base, high), k - above)
    return float(np.array([(high << 16) | low], dtype=np.uint32).view(np.float32)[0])


def magnitude_histogram(
    x: torch.Tensor, base: torch.Tensor | None = None, high: int = -1
) -> torch.Tensor:
    """Counts (int64, 65536 bins) of the high 16 bits of |x - base|'s float32 bits; with
    ``high`` >= 0, of the low 16 bits of the entries whose high 16 bits equal ``high``."""
    if base is not None and base.shape != x.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs base {tuple(base.shape)}")
    if not all(launch.takes(t) for t in (x, base) if t is not None):
        raise ValueError("the selection kernel takes CPU bf16, fp16 or float32 tensors")
    blocks = launch.compiled()
    if blocks is None:
        raise RuntimeError("the selection kernel cannot load (numba): see the warning logged")
    xs = launch.entries(x)
    bs = None if base is None else launch.entries(base)
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
