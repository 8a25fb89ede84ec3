"""Sparsifiers for task vectors: magnitude trim, random drop (DARE), outlier band (Breadcrumbs).

Every selection is a threshold found in linear time (radix selection, or ``torch.kthvalue``
per row), never a sort.
Entries tied with the threshold magnitude are all kept, as in the TIES reference code.
"""

from __future__ import annotations

import torch


def keep_count(numel: int, density: float) -> int:
    """Entries kept at ``density``: floor(density * n), but at least one of a non-empty tensor."""
    return min(numel, max(1, int(density * numel))) if numel else 0


def kth_largest(magnitudes: torch.Tensor, k: int) -> float:
    """The exact k-th largest entry of non-negative ``magnitudes``, by radix selection.

    Non-negative float32 values order like their bit patterns: one histogram of the high
    16 bits finds the bin holding the answer, a second one of the low 16 bits inside that
    bin finds the value. Two linear passes, about twice as fast as ``torch.kthvalue``.
    Wider dtypes (float64), which float32 would round, use ``torch.kthvalue``.
    """
    if magnitudes.dtype.itemsize > 4:
        flat = magnitudes.reshape(-1)
        return flat.kthvalue(flat.numel() - k + 1).values.item()
    bits = magnitudes.float().reshape(-1).view(torch.int32)
    high = torch.bincount(bits >> 16, minlength=1 << 16)
    b, above = top_bin(high, k)
    low = torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16)
    lo, _ = top_bin(low, k - above)
    return torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32).item()


def top_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry of a histogram, and the count in higher bins."""
    from_top = hist.flip(0).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return hist.numel() - 1 - idx, above


def trim_magnitude(
    delta: torch.Tensor, density: float, threshold: float | None = None
) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES trim).

    ``threshold`` replaces the per-tensor selection (the whole-model variant passes it in).
    """
    if threshold is None:
        if density >= 1.0 or delta.numel() == 0:
            return delta
        threshold = kth_largest(delta.abs(), keep_count(delta.numel(), density))
    return delta * (delta.abs() >= threshold)


def drop_random(
    delta: torch.Tensor, density: float, generator: torch.Generator, rescale: str = "exact"
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, then rescale the survivors.

    ``exact`` divides by ``density`` (= 1 - p, arXiv 2311.03099); ``l1`` matches the L1 norm
    of the kept entries to the original (mergekit's rule); ``none`` only drops. The mask is
    drawn on the CPU from ``generator`` so every device and executor gets the same bits.
    """
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    dropped = delta * keep.to(delta.device)
    if rescale == "exact":
        return dropped / density
    if rescale == "l1":
        before, after = delta.abs().sum(dtype=torch.float64), dropped.abs().sum(dtype=torch.float64)
        if before > 1e-7 and after > 1e-7:
            return dropped * (before / after).to(delta.dtype)
    return dropped


def outlier_band(
    delta: torch.Tensor, density: float, gamma: float, per_row: bool = False
) -> torch.Tensor:
    """Breadcrumbs: drop the top ``gamma`` fraction by magnitude, then keep the next ``density``.

    ``per_row`` ranks each row (last dimension) on its own, as the paper's code does; otherwise
    the whole tensor is ranked (mergekit). When floor(gamma * n) is 0, no outlier is removed.
    """
    if delta.numel() == 0:
        return delta
    rows = (
        delta.reshape(-1, delta.shape[-1]) if per_row and delta.dim() > 1 else delta.reshape(1, -1)
    )
    n = rows.shape[1]
    n_top = int(gamma * n)
    n_keep = min(keep_count(n, density), n - n_top)
    mag = rows.abs()
    mask = torch.ones_like(rows, dtype=torch.bool)
    if n_top:
        top = mag.kthvalue(n - n_top + 1, dim=1, keepdim=True).values
        mask &= mag < top
    if n_keep <= 0:
        return torch.zeros_like(delta)
    if n_keep < n - n_top:
        # Outliers become -1, so the n_keep-th largest remaining magnitude is the floor.
        low = mag.masked_fill(~mask, -1.0).kthvalue(n - n_keep + 1, dim=1, keepdim=True).values
        mask &= mag >= low
    return (rows * mask).reshape(delta.shape)
