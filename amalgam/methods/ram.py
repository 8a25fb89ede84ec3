"""RAM and RAM+ (tensor-local): Reinforced Agent Merging (arXiv 2601.13572), as mergekit 0.1.5
registers them (``ram``, ``ramplus_tl``).

Per tensor, an entry of task vector tau_i is active where |tau_i| > epsilon (inactive entries
count as zero). Entries active in one model only (unique) keep that model's delta; entries
active in several (shared) take the mean of the active deltas. RAM+ scales each model's unique
entries by lambda_i = 1 + r clamp(rho_i, 0, alpha), rho_i = (its shared active entries) /
max(its unique active entries, epsilon), counted over this tensor (mergekit's tensor-local
variant; the paper counts over the whole model).
"""

from __future__ import annotations

import torch

from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register

EPSILON = Param("epsilon", 1e-5, "magnitude above which a delta entry is active", low=0.0)


def ram_merge(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext, plus: bool
) -> torch.Tensor:
    eps = p.shared["epsilon"]
    b = base.float()
    deltas = [x.float() - b for x in inputs]
    active = [(d.abs() > eps).float() for d in deltas]
    count = torch.stack(active).sum(0) if active else torch.zeros_like(b)
    unique = (count == 1).float()
    shared_share = (count > 1).float() / count.clamp(min=1)  # 1/c on shared entries
    out = b.clone()
    for d, a in zip(deltas, active, strict=True):
        boost = 1.0
        if plus:
            rho = (a * (count > 1)).sum().item() / max((a * unique).sum().item(), eps)
            boost = 1.0 + p.shared["r"] * min(max(rho, 0.0), p.shared["alpha"])
        out += d * a * (unique * boost + shared_share)
    return out


def ram(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    return ram_merge(base, inputs, p, ctx, plus=False)


def ramplus_tl(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    return ram_merge(base, inputs, p, ctx, plus=True)


register(
    Method(
        name="ram",
        fn=ram,
        params=(EPSILON,),
        summary="unique task-vector entries kept, entries several models change averaged",
        paper="arXiv 2601.13572 (mergekit ram)",
    )
)
register(
    Method(
        name="ramplus_tl",
        fn=ramplus_tl,
        params=(
            EPSILON,
            Param("r", 0.1, "boost rate of a model's unique entries", low=0.0),
            Param("alpha", 0.2, "cap on the shared/unique ratio in the boost", low=0.0),
        ),
        summary="RAM with each model's unique entries boosted by its shared/unique ratio",
        paper="arXiv 2601.13572 (mergekit ramplus_tl)",
    )
)
