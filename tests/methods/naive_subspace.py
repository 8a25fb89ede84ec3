"""Naive formulations of TSV-M, PCB and TALL-mask consensus, written from the papers' equations.

TSV-M uses numpy in double precision and the whitening form of the orthogonalisation,
U (U^T U)^(-1/2), instead of the polar factor from an SVD; PCB and the TALL masks work on flat
Python lists with full sorts and explicit loops (PCB's intra-balancing as the paper's softmax).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def inverse_sqrt(gram: np.ndarray) -> np.ndarray:
    """gram^(-1/2) of a symmetric positive definite matrix, by eigendecomposition."""
    values, vectors = np.linalg.eigh(gram)
    return (vectors / np.sqrt(values)) @ vectors.T


def tsv_matrix(deltas: Sequence[np.ndarray], lam: float) -> np.ndarray:
    """lambda * TSV-M of one matrix's (already weighted) task vectors: top floor(r / N)
    triplets per task (those above 1e-9 of the task's largest), whitened, summed."""
    n = len(deltas)
    k = min(deltas[0].shape) // n
    us, sigmas, vts = [], [], []
    for d in deltas:
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        keep = [j for j in range(k) if s[j] > 1e-9 * s[0]]
        us += [u[:, j] for j in keep]
        sigmas += [s[j] for j in keep]
        vts += [vt[j] for j in keep]
    if not sigmas:
        return np.zeros_like(deltas[0])
    u_hat = np.stack(us, axis=1)
    vt_hat = np.stack(vts, axis=0)
    u_orth = u_hat @ inverse_sqrt(u_hat.T @ u_hat)
    vt_orth = inverse_sqrt(vt_hat @ vt_hat.T) @ vt_hat
    return lam * (u_orth @ np.diag(sigmas) @ vt_orth)


def tsv_model(
    base: dict[str, np.ndarray],
    models: Sequence[dict[str, np.ndarray]],
    weights: Sequence[float],
    lam: float,
) -> dict[str, np.ndarray]:
    """TSV-M over a whole state dict: 2-D tensors with r >= N by ``tsv_matrix``, every other
    tensor base + lambda * mean of the weighted task vectors."""
    out = {}
    for name, b in base.items():
        deltas = [w * (m[name] - b) for m, w in zip(models, weights, strict=True)]
        if b.ndim == 2 and min(b.shape) >= len(models):
            out[name] = b + tsv_matrix(deltas, lam)
        else:
            out[name] = b + lam * sum(deltas) / len(models)
    return out


def min_max(values: Sequence[float]) -> list[float]:
    low, high = min(values), max(values)
    return [(v - low) / (high - low) if high > low else 0.0 for v in values]


def softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def pcb(
    base: Sequence[float],
    deltas: Sequence[Sequence[float]],
    weights: Sequence[float],
    densities: Sequence[float],
    clamp: float,
    lam: float,
) -> list[float]:
    """PCB-Merging on one flat tensor, one entry at a time (order statistics by full sort)."""
    n, d = len(deltas), len(base)
    summed = [sum(t[j] for t in deltas) for j in range(d)]
    num, den = [0.0] * d, [0.0] * d
    for t, w, r in zip(deltas, weights, densities, strict=True):
        ranked = sorted(abs(v) for v in t)
        low, high = ranked[int(d * clamp)], ranked[int(d * (1 - clamp)) - 1]
        mag = [min(max(abs(v), low), high) for v in t]
        intra = softmax([n * v * v for v in min_max(mag)])
        inter = [math.tanh(t[j] * summed[j]) for j in range(d)]
        beta = [x * y for x, y in zip(intra, inter, strict=True)]
        floor = sorted(beta)[min(int(d * (1 - r)), d - 1)]
        scale = min_max([max(v, floor) for v in beta])
        for j in range(d):
            sign = (t[j] > 0) - (t[j] < 0)
            num[j] += w * scale[j] * sign * mag[j]
            den[j] += scale[j]
    return [b + lam * x / max(y, 1e-12) for b, x, y in zip(base, num, den, strict=True)]


def consensus(
    deltas: Sequence[Sequence[float]],
    merged: Sequence[float],
    mask_lambdas: Sequence[float],
    agreement: int,
) -> list[float]:
    """The merged task vector where at least ``agreement`` TALL masks
    |t_i| > lambda_i |merged - t_i| select an entry, else 0."""
    out = []
    for j, tau in enumerate(merged):
        votes = 0
        for t, lam in zip(deltas, mask_lambdas, strict=True):
            if abs(t[j]) > lam * abs(tau - t[j]):
                votes += 1
        out.append(tau if votes >= agreement else 0.0)
    return out
