"""RegMean: closed-form merge of linear layers from their input Gram matrices (arXiv 2212.09849)."""

from __future__ import annotations

from typing import Any

import torch

from amalgam.errors import MergeError
from amalgam.merge.base import MergeContext, Method, Param, TensorParams, register
from amalgam.merge.fisher import SAMPLES, check_statistics_params, model_weights


def solve_psd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^-1 b for symmetric positive semi-definite ``a`` (float64): Cholesky when ``a`` is
    positive definite, else the pseudo-inverse (minimum-norm solution on a's range)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.pinv(a, hermitian=True) @ b


def regmean_merge(
    base: torch.Tensor | None, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    """For a linear weight W (out x in) with per-model input Grams G_i:
    W^T = (sum_i w_i G~_i)^-1 sum_i w_i G~_i W_i^T, G~_i = alpha G_i + (1 - alpha) diag(G_i),
    which minimises sum_i w_i ||X~_i (W - W_i)^T||^2. Solved in float64 as
    W = W_avg + correction, so input directions no model's data reached (a singular sum of
    Grams) keep the weighted average. Tensors without Grams (embeddings, norms, biases) are
    the w-weighted average, as in the paper. The base is not used."""
    weights = model_weights(p)
    grams = ctx.model_stats
    avg = sum(x.double() * w for x, w in zip(inputs, weights, strict=True)) / sum(weights)
    if all(g is None for g in grams):
        return avg.float()
    if any(g is None for g in grams) or inputs[0].dim() != 2:
        raise MergeError(f"tensor '{ctx.name}': Gram matrices missing for some models")
    alpha = float(p.shared["alpha"])
    a = torch.zeros_like(grams[0], dtype=torch.float64)
    b = torch.zeros(avg.shape[1], avg.shape[0], dtype=torch.float64, device=avg.device)
    for x, g, w in zip(inputs, grams, weights, strict=True):
        g = g.double()
        reg = g * alpha + torch.diag_embed(g.diagonal() * (1.0 - alpha))
        reg *= w
        a += reg
        b += reg @ (x.double() - avg).T
    return (avg + solve_psd(a, b).T).float()


def gram_statistics(shared: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "gram", {"samples": int(shared["samples"])}


register(
    Method(
        name="regmean",
        fn=regmean_merge,
        params=(
            Param("weight", 1.0, "coefficient of this model", per_model=True, low=0.0),
            Param(
                "alpha",
                0.9,
                "scale of the Grams' off-diagonal entries (1: plain RegMean)",
                low=0.0,
                high=1.0,
            ),
            SAMPLES,
        ),
        summary="linear layers: least-squares fit to every model's outputs on its data; "
        "other tensors averaged",
        paper="arXiv 2212.09849",
        needs_base=False,
        statistics=gram_statistics,
        check_recipe=check_statistics_params,
    )
)
