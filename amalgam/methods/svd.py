"""Float32 SVD helpers: top-k singular triplets (exact or randomized) and the polar factor."""

from __future__ import annotations

import torch

OVERSAMPLE = 10
POWER_ITERATIONS = 2


def top_singular(
    a: torch.Tensor, k: int, lowrank: bool = False, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` leading singular triplets of ``a`` (m x n): U (m x k), S (k), Vh (k x n).

    Exact: a thin SVD. ``lowrank``: the randomized range finder of Halko, Martinsson and Tropp
    (arXiv 0909.4061) with OVERSAMPLE extra columns and POWER_ITERATIONS subspace iterations;
    its Gaussian test matrix is drawn on the CPU from ``generator`` (same draw on any device).
    It is used only when the sketch is smaller than the matrix; otherwise the SVD is exact.
    """
    a = a.float()
    m, n = a.shape
    width = k + OVERSAMPLE
    if not lowrank or width >= min(m, n):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    omega = torch.randn(n, width, generator=generator).to(a.device)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(a.mT @ q).Q
        q = torch.linalg.qr(a @ q).Q
    ub, s, vh = torch.linalg.svd(q.mT @ a, full_matrices=False)
    return (q @ ub[:, :k]), s[:k], vh[:k]


def numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above max(shape) * eps(float32) * s_max (``torch.linalg.matrix_rank``'s
    default tolerance); ``s`` is sorted descending."""
    if s.numel() == 0:
        return 0
    tol = max(shape) * torch.finfo(torch.float32).eps * float(s[0])
    return int((s > tol).sum()) if float(s[0]) > 0 else 0


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of ``x`` (P Q^T from x = P S Q^T): the matrix with
    orthonormal columns (tall x) or rows (wide x) nearest to ``x`` in Frobenius norm.

    Where ``x`` is rank-deficient that factor is not unique (its null-space part is whatever the
    SVD routine returns); the singular pairs below ``numerical_rank``'s tolerance are left out,
    which gives the unique partial isometry with the same range as ``x``."""
    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    r = numerical_rank(s, (x.shape[0], x.shape[1]))
    return p[:, :r] @ qh[:r]
