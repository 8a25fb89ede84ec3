"""Merging adapters' low-rank factors into one adapter, module by module, without forming the
dense update: ``concat`` (exact) and LoRA-LEGO (rank-wise clustering, arXiv 2409.16167).

Each input is one module's factors ``B`` (d_out x r), ``A`` (r x d_in) with its merge weight
already folded in with the LoRA scale, so that its update is ``B @ A``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Factors:
    """One module's low-rank update ``B @ A`` (scale and merge weight folded into ``B``)."""

    B: torch.Tensor  # d_out x r
    A: torch.Tensor  # r x d_in

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.B @ self.A

    def norm(self) -> torch.Tensor:
        """Frobenius norm of ``B @ A`` from the r x r Gram matrices, never the dense update."""
        return torch.sqrt(((self.B.T @ self.B) * (self.A @ self.A.T)).sum().clamp_min(0))


def concat(parts: list[Factors]) -> Factors:
    """The sum of the updates as one adapter of rank sum(r_i): ``[B_1 ... B_n] @ [A_1; ...;
    A_n] = sum_i B_i A_i`` (exact, so linear and task-arithmetic merges of adapters stay
    adapters)."""
    return Factors(torch.cat([p.B for p in parts], dim=1), torch.cat([p.A for p in parts], dim=0))


def units(parts: list[Factors]) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimal semantic units (MSUs) of the paper's Sec. 3: column j of ``B_i`` with row j
    of ``A_i``, for every rank of every input; ``sum_u b_u a_u^T`` is the sum of the updates
    (concatenation equals summation). Returns (b: R x d_out, a: R x d_in), each unit put in
    a canonical form: equal norms ``|b| = |a|`` and the largest entry of ``a`` positive, since
    (c b, a / c) is the same unit for any c != 0 and k-means must see it as one point."""
    merged = concat(parts)
    b, a = merged.B.T.clone(), merged.A.clone()
    nb, na = b.norm(dim=1), a.norm(dim=1)
    live = (nb > 0) & (na > 0)
    b, a, nb, na = b[live], a[live], nb[live], na[live]
    ratio = torch.sqrt(na / nb)
    b, a = b * ratio[:, None], a / ratio[:, None]
    sign = torch.sign(a.gather(1, a.abs().argmax(dim=1, keepdim=True)))
    return b * sign, a * sign


def lora_lego(parts: list[Factors], rank: int, seed: int = 0, iterations: int = 50) -> Factors:
    """LoRA-LEGO (arXiv 2409.16167): pool the inputs' MSUs, cluster them into ``rank``
    groups by k-means on the concatenated ``[b; a]`` vectors, and take each cluster's centroid
    as one rank of the merged adapter, then reweight:

    - parameter reweighting (the paper's "norm decay": averaging non-parallel units shrinks
      them): each centroid unit is scaled so that its update's norm ``|b_c| |a_c|`` is the
      mean of its members' ``|b_u| |a_u|``;
    - output reweighting (the paper's "variance expansion"): one factor for the module, so
      that the merged update has the Frobenius norm of the inputs' summed update.

    The two reweightings follow the paper's description; its exact scaling constants are not
    public in a form checked here, so these are amalgam's reading (stated in docs/adapters.md).
    With ``rank`` at least the number of units, every unit is its own cluster and the result
    is :func:`concat`'s update exactly. Deterministic for a given ``seed``."""
    b, a = units(parts)
    n = b.shape[0]
    if n == 0:
        return Factors(parts[0].B[:, :0], parts[0].A[:0])
    if rank >= n:
        return Factors(b.T.contiguous(), a.contiguous())
    # lazy: scipy costs every `amalgam merge` half a second of start-up
    from scipy.cluster.vq import kmeans2

    points = torch.cat([b, a], dim=1).double().numpy()
    centroids, labels = kmeans2(
        points, rank, iter=iterations, minit="++", seed=np.random.default_rng(seed)
    )
    labels_t = torch.from_numpy(labels)
    cb, ca = [], []
    member_norm = b.norm(dim=1) * a.norm(dim=1)
    for c in range(rank):
        members = labels_t == c
        if not members.any():
            continue  # k-means left this cluster empty: the merged rank is lower
        centre = torch.from_numpy(centroids[c]).to(b.dtype)
        cb_c, ca_c = centre[: b.shape[1]], centre[b.shape[1] :]
        size = cb_c.norm() * ca_c.norm()
        if size == 0:
            continue
        factor = torch.sqrt(member_norm[members].mean() / size)
        cb.append(cb_c * factor)
        ca.append(ca_c * factor)
    merged = Factors(torch.stack(cb, dim=1), torch.stack(ca, dim=0))
    target, got = concat(parts).norm(), merged.norm()
    if got > 0:
        gamma = torch.sqrt(target / got)
        merged = Factors(merged.B * gamma, merged.A * gamma)
    return merged
