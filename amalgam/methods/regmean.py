"""RegMean: closed-form merge of linear layers and the input embedding from their input Grams
(arXiv 2212.09849)."""

from __future__ import annotations

from typing import Any

import torch

from amalgam.errors import MergeError
from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.fisher import SAMPLES, model_weights
from amalgam.methods.needs import DataStatistics
from amalgam.methods.params import recipe_wide
from amalgam.statistics.settings import settings_for


def solve_psd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^-1 b for symmetric positive semi-definite ``a`` (float64): Cholesky when ``a`` is
    positive definite, else the pseudo-inverse (minimum-norm solution on a's range)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.pinv(a, hermitian=True) @ b


EMBEDDINGS = ("gram", "average")


def regmean_merge(
    base: torch.Tensor | None, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    """For a linear weight W (out x in) with per-model input Grams G_i:
    W^T = (sum_i w_i G~_i)^-1 sum_i w_i G~_i W_i^T, G~_i = alpha G_i + (1 - alpha) diag(G_i),
    which minimises sum_i w_i ||X~_i (W - W_i)^T||^2. Solved in float64 as
    W = W_avg + correction, so input directions no model's data reached (a singular sum of
    Grams) keep the weighted average. Norms, biases and every tensor without a statistic are
    the w-weighted average. The base is not used.

    The input embedding (a 1-D statistic: each token's share c_i(v) of model i's data tokens):
    the paper averages embeddings (``embeddings: average``). amalgam's default (``gram``)
    applies the same objective to it: an embedding lookup is a linear map of one-hot tokens,
    whose Gram is diag(c_i), so the solution is, row by row, the average of the models' rows
    weighted by w_i c_i(v) (alpha changes nothing: the Gram is diagonal), and a row no model's
    data holds keeps the plain average. Where models' data use different tokens (other
    languages or scripts), each row follows the models that use it instead of being shrunk
    by the models that never saw it."""
    weights = model_weights(p)
    grams = ctx.model_stats
    avg = sum(x.double() * w for x, w in zip(inputs, weights, strict=True)) / sum(weights)
    shares = any(g is not None and g.dim() == 1 for g in grams)
    if all(g is None for g in grams) or (shares and p.shared["embeddings"] == "average"):
        return avg.float()
    if any(g is None for g in grams) or inputs[0].dim() != 2:
        raise MergeError(f"tensor '{ctx.name}': Gram matrices missing for some models")
    if shares:
        return _embedding_rows(inputs, grams, weights, avg, ctx.name)
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


def _embedding_rows(
    inputs: list[torch.Tensor],
    shares: tuple[torch.Tensor, ...],
    weights: list[float],
    avg: torch.Tensor,
    name: str,
) -> torch.Tensor:
    """Row v: avg[v] + sum_i w_i c_i(v) (E_i[v] - avg[v]) / sum_i w_i c_i(v), in float64;
    rows whose sum is zero keep ``avg``."""
    rows = avg.shape[0]
    if any(c.dim() != 1 or len(c) != rows for c in shares):
        raise MergeError(f"tensor '{name}': token shares must be {rows} long, one per row")
    total = torch.zeros(rows, dtype=torch.float64, device=avg.device)
    shift = torch.zeros_like(avg)
    for x, c, w in zip(inputs, shares, weights, strict=True):
        wc = c.double() * w
        total += wc
        shift += wc[:, None] * (x.double() - avg)
    shift /= torch.where(total > 0, total, 1.0)[:, None]  # unseen rows: shift is zero
    return (avg + shift).float()


def gram_statistics(shared: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "gram", settings_for("gram", int(shared["samples"]))


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
            Param(
                "embeddings",
                "gram",
                "input embedding: rows weighted by each model's token shares (gram, the same "
                "least squares on one-hot inputs) or averaged (average, the paper's scope)",
                kind=str,
                choices=EMBEDDINGS,
                gradient=False,
            ),
        ),
        summary="linear layers and the input embedding: least-squares fit to every model's "
        "outputs on its data; other tensors averaged",
        paper="arXiv 2212.09849",
        gpu_bound=True,
        needs_base=False,
        check_recipe=recipe_wide(("samples",)),
        needs=(DataStatistics(gram_statistics),),
    )
)
