"""Sparsifiers for task vectors: magnitude trim, random drop (DARE), outlier band (Breadcrumbs).

Every selection uses a threshold from ``torch.kthvalue`` (linear time), never a sort.
Entries tied with the threshold magnitude are all kept, as in the TIES reference code.
"""

from __future__ import annotations

import torch


def keep_count(numel: int, density: float) -> int:
    """Entries kept at ``density``: floor(density * n), but at least one of a non-empty tensor."""
    return min(numel, max(1, int(density * numel))) if numel else 0


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of ``values`` (flattened), by linear-time selection."""
    flat = values.reshape(-1)
    return flat.kthvalue(flat.numel() - k + 1).values


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
