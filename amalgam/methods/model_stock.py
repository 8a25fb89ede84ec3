"""Model Stock: interpolate the average of fine-tunes toward the base (arXiv 2403.19522).

t = k cos / (1 + (k - 1) cos) from the mean pairwise cosine of the task vectors, clamped to
[0, 1] (the reference code does not clamp; a negative denominator would make t explode).
"""

from __future__ import annotations

import itertools

import torch

from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register


def stock_ratio(deltas: torch.Tensor) -> torch.Tensor:
    """Interpolation ratio from stacked task vectors [k, rows, n] (one ratio per row)."""
    k = deltas.shape[0]
    norms = deltas.double().norm(dim=-1)
    cosines = []
    for i, j in itertools.combinations(range(k), 2):
        dot = (deltas[i].double() * deltas[j].double()).sum(-1)
        cosines.append((dot / (norms[i] * norms[j]).clamp_min(1e-6)).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(0)
    denom = 1 + (k - 1) * cos
    t = torch.where(denom.abs() > 1e-12, k * cos / denom, torch.zeros_like(cos))
    return t.clamp(0.0, 1.0)


def model_stock(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    base, inputs = base.float(), [x.float() for x in inputs]
    rows = base.shape[0] if p.shared["filter_wise"] and base.dim() > 1 else 1
    deltas = torch.stack([x - base for x in inputs]).reshape(len(inputs), rows, -1)
    t = stock_ratio(deltas).to(base.dtype)
    avg = torch.stack(inputs).mean(0).reshape(rows, -1)
    out = t[:, None] * avg + (1 - t[:, None]) * base.reshape(rows, -1)
    return out.reshape(base.shape)


register(
    Method(
        name="model_stock",
        fn=model_stock,
        params=(
            Param(
                "filter_wise",
                False,
                "one ratio per output row instead of per tensor",
                kind=bool,
                gradient=False,
            ),
        ),
        summary="average of fine-tunes pulled toward the base by their task vectors' angle",
        paper="arXiv 2403.19522",
        min_models=2,
    )
)
