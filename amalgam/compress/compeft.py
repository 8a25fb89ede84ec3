"""ComPEFT's per-tensor math: top-k of the task vector, kept as sign x one scale.

ComPEFT (Yadav, Choshen, Raffel, Bansal; arXiv 2311.13171) keeps the top-k entries of a task
vector tau = theta_t - theta_0 by magnitude and replaces each by sign(tau) * alpha * sigma, with
sigma = std(tau) over the whole, uncompressed tau.

Variant implemented: top-k and sigma are taken **per tensor** (the official code flattens the
whole update into one vector and takes one global top-k and one sigma); per tensor keeps the
work streaming and cannot starve small tensors such as norms. sigma is the population standard
deviation (no Bessel correction). ``scale="mean"`` replaces alpha * sigma by alpha times the mean
magnitude of the kept entries (the STC scale, ``replace_factor=-2`` in the official code), which
for alpha = 1 is the least-squares scale for a fixed sign pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TernaryTensor:
    """A compressed task vector: sorted flat positions kept, their signs, and one scale."""

    shape: tuple[int, ...]
    positions: torch.Tensor  # int64, ascending
    negative: torch.Tensor  # bool, one per position: True where tau < 0
    scale: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def delta(self) -> torch.Tensor:
        """The dense float32 task vector this stands for: +-scale at the positions, else 0."""
        out = torch.zeros(self.numel, dtype=torch.float32)
        signs = 1.0 - 2.0 * self.negative.to(torch.float32)
        out[self.positions] = torch.tensor(self.scale, dtype=torch.float32) * signs
        return out.reshape(self.shape)


def kept_count(numel: int, density: float) -> int:
    """Entries kept out of ``numel`` at ``density``: ceil(density * numel), at least one."""
    return min(numel, max(1, math.ceil(density * numel - 1e-9)))


def compeft(
    tau: torch.Tensor, density: float, scale: str = "mean", alpha: float = 1.0
) -> TernaryTensor:
    """Compress one task vector (any shape) to its top ``density`` entries as sign x scale.

    Entries that are exactly zero are never kept, so a tensor the fine-tune left unchanged
    compresses to nothing.
    """
    flat = tau.detach().reshape(-1).to(torch.float32)
    magnitude = flat.abs()
    k = min(kept_count(flat.numel(), density), int(torch.count_nonzero(magnitude)))
    positions = torch.topk(magnitude, k, sorted=False).indices.sort().values
    kept = flat[positions]
    if scale == "std":
        size = alpha * float(flat.std(correction=0)) if flat.numel() else 0.0
    elif scale == "mean":
        size = alpha * float(kept.abs().mean()) if k else 0.0
    else:
        raise ValueError(f"scale: unknown {scale!r} (use 'std' or 'mean')")
    return TernaryTensor(tuple(tau.shape), positions, kept < 0, size)
