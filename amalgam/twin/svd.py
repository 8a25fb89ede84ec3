"""Truncated SVD of one task's exclusive knowledge (Twin-Merging, arXiv 2406.15479)."""

from __future__ import annotations

import torch


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_r S_r, V_r^T)`` of a 2-D ``delta`` in float32: their product is the best rank-``rank``
    approximation in Frobenius norm (Eckart-Young). ``rank`` must lie in 1..min(m, n)."""
    if delta.ndim != 2 or not 0 < rank <= min(delta.shape):
        raise ValueError(f"rank {rank} is not in 1..min{tuple(delta.shape)}")
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    return (u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous()


def mix(
    shared: torch.Tensor, weights: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """``shared + sum_t weights[t] * US_t @ V_t`` in one matmul (factors of one tensor, one
    pair per task, in the order of ``weights``)."""
    us = torch.cat([w * f[0] for w, f in zip(weights, factors, strict=True)], dim=1)
    v = torch.cat([f[1] for f in factors], dim=0)
    return shared.to(torch.float32) + us @ v
