"""MC-SMoE's compress step: a merged expert's weight as low-rank plus sparse, W ~ U V + S.

MC-SMoE (arXiv 2310.01334) compresses the merged experts with LoSparse (arXiv 2306.11222):
``U V`` is the rank-``r`` truncated SVD of ``W`` (``U`` carries the singular values), ``S``
keeps the ``density`` share of the entries of the residual ``W - U V`` of largest magnitude
(ties: the lower flat index), the rest zero. Deviation: one shot, with no distillation
finetune and no iterative pruning of ``S`` (the papers recover accuracy by training).

Stored entries of tensor ``name``: ``name:lowrank_u`` (out x r), ``name:lowrank_v`` (r x in),
both in the tensor's dtype; ``name:positions`` (the kept residual positions in the smallest
code of :mod:`amalgam.compress.codec`) and ``name:values`` (their residual values, in the
tensor's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amalgam.compress import codec

U, V, VALUES = ":lowrank_u", ":lowrank_v", ":values"
ENCODING = "losparse"


@dataclass(frozen=True)
class LowRankSparse:
    """``u @ v`` plus ``values`` at the flat ``positions`` (sorted): a (out, in) matrix."""

    u: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    values: torch.Tensor

    def dense(self) -> torch.Tensor:
        out = self.u.float() @ self.v.float()
        out.view(-1)[self.positions] += self.values.float()
        return out


def losparse(weight: torch.Tensor, rank: int, density: float) -> LowRankSparse:
    """The rank-``rank`` SVD of the 2-D ``weight`` plus the top ``density`` share of the
    residual by magnitude (``round(density * numel)`` entries); in ``weight``'s dtype."""
    w = weight.float()
    rank = min(rank, *w.shape)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u, v = u[:, :rank] * s[:rank], vh[:rank]
    residual = (w - u @ v).reshape(-1)
    kept = round(density * residual.numel())
    order = torch.argsort(residual.abs(), descending=True, stable=True)[:kept]
    positions = torch.sort(order).values
    dtype = weight.dtype
    return LowRankSparse(u.to(dtype), v.to(dtype), positions, residual[positions].to(dtype))


def encode(name: str, t: LowRankSparse) -> list[tuple[str, torch.Tensor]]:
    """The stored entries of one decomposed tensor, in file order."""
    numel = t.u.shape[0] * t.v.shape[1]
    return [
        (name + U, t.u.contiguous()),
        (name + V, t.v.contiguous()),
        (name + codec.POSITIONS, codec.encode_positions(t.positions, numel)),
        (name + VALUES, t.values),
    ]


def decode(
    shape: tuple[int, ...],
    kept: int,
    u: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    values: torch.Tensor,
) -> LowRankSparse:
    """Invert :func:`encode` given the original shape and the number of kept residual entries."""
    numel = shape[0] * shape[1]
    return LowRankSparse(u, v, codec.decode_positions(positions, numel, kept), values)
