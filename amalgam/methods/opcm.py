"""OPCM: orthogonal projection-based continual merging (arXiv 2501.09522).

Absorbing model t (task vector tau_t = W_t - W0) into the merged task vector D (stored as the
merged model M = W0 + D, with the divisor lambda_{t-1} in the continual state):

1. every 2-D weight but embeddings: with the thin SVD D = U S V^T in float32 and rho the first
   index at which the cumulative share of singular values (not squared) exceeds ``alpha``, the
   coefficients C = U^T tau V lose their whole diagonal and their top-left rho x rho block:
   tau' = tau - U R V^T, R holding exactly those coefficients. This is the projection of the
   public code, which rotates by the full U and V and zeroes those entries of U^T tau V; only
   the first min(m, n) singular directions carry a diagonal, so the thin SVD gives the same
   tau' with m x k and n x k factors instead of m x m and n x n. (The paper's text projects
   onto the complement of the top-rho block alone; the code, followed here, also removes
   every diagonal coefficient.) Other tensors (norms, biases, embeddings) take tau unprojected.
   A layer whose D is zero is not projected. ``projection: false`` skips this step (the
   rescaling alone, the paper's ablation: what the projection adds on a given family).
2. S_t = lambda_{t-1} D + tau' (the un-normalised running sum), and
   lambda_t = ||S_t|| / mean_j ||tau_j||, both norms over the whole model: the engine measures
   ||S_t|| and ||tau_t|| in a first streaming pass (``unscaled`` below), then writes
   M_t = W0 + S_t / lambda_t in a second, recomputing the projection rather than holding S_t.

The first model is absorbed as is (D = 0, lambda_1 = 1). SVDs run exact (``torch.linalg.svd``)
on the merge device; on CUDA with the ``gesvd`` driver, as the public code.
"""

from __future__ import annotations

import re

import torch

from amalgam.methods.base import MergeContext, Param, TensorParams
from amalgam.methods.continual_baselines import continual, step_of

EMBEDDING_RE = re.compile(r"embed|(?:^|\.)(?:wte|wpe)(?:\.|$)")


def projects(name: str, tensor: torch.Tensor) -> bool:
    """Whether OPCM projects this tensor: 2-D weights (linear layers), not embeddings."""
    return tensor.dim() == 2 and not EMBEDDING_RE.search(name)


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """rho: the first index whose cumulative share of the singular values exceeds ``alpha``
    (0 when none does)."""
    share = s.cumsum(0) / s.sum()
    return int((share > alpha).float().argmax())


def project_out(tau: torch.Tensor, merged: torch.Tensor, alpha: float) -> torch.Tensor:
    """tau without its diagonal coefficients and top-left rho x rho block in the singular
    bases of ``merged`` (float32 2-D tensors; a new tensor)."""
    driver = "gesvd" if merged.is_cuda else None
    u, s, vh = torch.linalg.svd(merged, full_matrices=False, driver=driver)
    if not bool(s.sum() > 0):
        return tau.clone()
    rho = split_rank(s, alpha)
    coeff = u.T @ tau @ vh.T
    removed = torch.diag_embed(coeff.diagonal())
    removed[:rho, :rho] = coeff[:rho, :rho]
    return tau - u @ removed @ vh


def opcm_unscaled(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    """S_t = lambda_{t-1} (M_{t-1} - W0) + projected tau_t, in float32."""
    b = base.float()
    tau = torch.sub(inputs[-1].float(), b)
    if len(inputs) == 1:
        return tau
    merged = torch.sub(inputs[0].float(), b)
    if p.shared["projection"] and projects(ctx.name, tau):
        tau = project_out(tau, merged, p.shared["alpha"])
    return merged.mul_(step_of(ctx).prev_scale).add_(tau)


def opcm(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    """M_t = W0 + S_t / lambda_t."""
    return opcm_unscaled(base, inputs, p, ctx).div_(step_of(ctx).scale).add_(base.float())


continual(
    "opcm",
    opcm,
    (
        Param(
            "alpha",
            0.5,
            "share of the merged task vector's singular-value mass whose directions are kept "
            "clear of new task vectors",
            low=0.0,
            high=1.0,
        ),
        Param(
            "projection",
            True,
            "project new task vectors at all (false: the adaptive rescaling alone, to measure "
            "what the projection adds)",
            kind=bool,
            gradient=False,
        ),
    ),
    "project each new task vector off the merge's dominant singular directions, rescale to "
    "the mean task-vector norm",
    unscaled=opcm_unscaled,
    gpu_bound=True,
)
