"""PCB-Merging: Parameter Competition Balancing (arXiv 2410.02396), per tensor or whole model.

For each model i, with task vector t_i = W_i - W0 and N models:
  a_i = |t_i| clamped to its order statistics at floor(n q) and floor(n (1 - q)) - 1
  (ascending, q = ``clamp``: outliers);
  intra_i = exp(N * (norm(a_i)^2 - 1)), norm = min-max scaling (the paper's softmax of
  N * norm(t_i * t_i) up to a positive factor, which the last min-max removes);
  inter_i = tanh(t_i * sum_j t_j) (the official ``pcb-merging.py``; the paper's
  sum_j softmax(norm(t_i * t_j)) is not implemented);
  beta_i = norm(max(intra_i * inter_i, its order statistic at floor(n (1 - density)))), so only
  entries above the top-``density`` threshold get a weight, in (0, 1];
  W = W0 + lambda * sum_i w_i beta_i sign(t_i) a_i / max(sum_i beta_i, 1e-12).
``scope: tensor`` (default) takes every order statistic, minimum and maximum over each tensor;
``scope: model`` over each model's whole task vector, as the official code does, from exact
streaming order statistics (``amalgam.methods.whole_model.OrderStatistics``, four passes).
A constant tensor (or model) has norm 0 everywhere (the official code divides by zero).
The official code searches per-model lambda_i in [0.8, 1.3]; here ``weight`` plays lambda_i.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.needs import WholeModelStatistic
from amalgam.methods.params import recipe_wide
from amalgam.methods.task_vectors import LAMBDA, WEIGHT
from amalgam.methods.whole_model import OrderStatistics

SCOPE = Param(
    "scope",
    "tensor",
    "order statistics and min-max over each tensor, or each model's whole task vector",
    kind=str,
    choices=("tensor", "model"),
    gradient=False,
)
PARAMS = (
    WEIGHT,
    Param(
        "density",
        0.1,
        "fraction of entries of each task vector that get a weight (the paper's ratio r)",
        per_model=True,
        low=0.0,
        high=1.0,
        low_open=True,
    ),
    Param(
        "clamp",
        0.0001,
        "fraction of magnitudes clamped at each end before balancing (outliers)",
        low=0.0,
        high=0.5,
    ),
    LAMBDA,
    SCOPE,
)


def clamp_ranks(size: int, q: float) -> list[int]:
    """Ascending ranks of the outlier clamp's lower and upper bounds (clipped to the range)."""
    return [min(max(r, 0), size - 1) for r in (int(size * q), int(size * (1 - q)) - 1)]


def floor_rank(size: int, density: float) -> int:
    """Ascending rank of the weight floor: entries strictly above it get a weight."""
    return min(int(size * (1 - density)), size - 1)


def order_statistic(flat: torch.Tensor, rank: int) -> float:
    return float(flat.kthvalue(rank + 1).values)


def task_sum(deltas: Iterable[torch.Tensor]) -> torch.Tensor:
    """sum_j t_j, added in model order (the same bits in the statistics and the merge pass)."""
    models = iter(deltas)
    total = next(models).clone()
    for d in models:
        total.add_(d)
    return total


def balance(
    t: torch.Tensor, total: torch.Tensor, low: float, high: float, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(intra * inter, clamped magnitudes) for task vector ``t`` given its clamp bounds."""
    mag = t.abs().clamp_(low, high)
    norm = (mag - low).div_(high - low) if high > low else torch.zeros_like(mag)
    beta = norm.square_().sub_(1).mul_(n).exp_().mul_(torch.tanh(t * total))
    return beta, mag


def scale(beta: torch.Tensor, floor: float, top: float) -> torch.Tensor:
    """Min-max of beta clamped below at ``floor`` (``top``: its maximum); 0 where constant."""
    if top <= floor:
        return torch.zeros_like(beta)
    return beta.clamp_(min=floor).sub_(floor).div_(top - floor)


def pcb_merge(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    b = base.float().reshape(-1)
    n, size, q = len(inputs), b.numel(), p.shared["clamp"]
    if size == 0:
        return base.float().clone()
    bounds = ctx.stats.get(PCBStatistics.key) if p.shared["scope"] == "model" else None
    total = task_sum(torch.sub(x.reshape(-1), b) for x in inputs)
    num, den = torch.zeros_like(b), torch.zeros_like(b)
    for i, (x, m) in enumerate(zip(inputs, p.per_model, strict=True)):
        t = torch.sub(x.reshape(-1), b)
        if bounds is not None:
            low, high, floor, top = bounds[i]
        else:
            low, high = (order_statistic(t.abs(), r) for r in clamp_ranks(size, q))
        beta, mag = balance(t, total, low, high, n)
        if bounds is None:
            floor, top = order_statistic(beta, floor_rank(size, m["density"])), float(beta.max())
        weight = scale(beta, floor, top)
        num.addcmul_(weight, t.sign_().mul_(mag), value=m["weight"])
        den.add_(weight)
    merged = num.div_(den.clamp_(min=1e-12))
    return torch.add(b, merged, alpha=p.shared["lambda"]).reshape(base.shape)


class PCBStatistics:
    """Per model, over its whole task vector: the outlier clamp's bounds (passes 1-2), then
    the weight floor and the maximum of intra * inter (passes 3-4)."""

    key = "pcb_model"
    passes = 4

    def __init__(self, densities: list[float], clamp: float):
        self.densities, self.clamp = densities, clamp
        self.magnitudes = [OrderStatistics() for _ in densities]
        self.betas = [OrderStatistics() for _ in densities]
        self.bounds: list[list[float]] = []

    def update(self, pass_: int, deltas: list[torch.Tensor]) -> None:
        if pass_ < 2:
            for stats, d in zip(self.magnitudes, deltas, strict=True):
                (stats.add_high if pass_ == 0 else stats.add_low)(d.abs())
            return
        flat = [d.reshape(-1) for d in deltas]
        total = task_sum(flat)
        for stats, t, (low, high) in zip(self.betas, flat, self.bounds, strict=True):
            beta, _ = balance(t, total, low, high, len(flat))
            (stats.add_high if pass_ == 2 else stats.add_low)(beta)

    def fork(self) -> PCBStatistics:
        part = PCBStatistics(self.densities, self.clamp)
        part.magnitudes = [s.fork() for s in self.magnitudes]
        part.betas = [s.fork() for s in self.betas]
        part.bounds = self.bounds
        return part

    def join(self, part: PCBStatistics) -> None:
        for mine, theirs in zip(
            self.magnitudes + self.betas, part.magnitudes + part.betas, strict=True
        ):
            mine.join(theirs)

    def end_pass(self, pass_: int) -> None:
        if pass_ == 0:
            for stats in self.magnitudes:
                stats.choose(clamp_ranks(stats.count, self.clamp))
        elif pass_ == 1:
            self.bounds = [stats.values() for stats in self.magnitudes]
        elif pass_ == 2:
            for stats, density in zip(self.betas, self.densities, strict=True):
                stats.choose([floor_rank(stats.count, density)])

    def result(self) -> list[tuple[float, float, float, float]]:
        return [
            (low, high, beta.values()[0], beta.maximum)
            for (low, high), beta in zip(self.bounds, self.betas, strict=True)
        ]


def model_scope_stats(p: TensorParams) -> list[PCBStatistics]:
    if p.shared["scope"] != "model":
        return []
    return [PCBStatistics(p.each("density"), p.shared["clamp"])]


register(
    Method(
        name="pcb",
        fn=pcb_merge,
        params=PARAMS,
        summary="weight task-vector entries by intra- and inter-task balancing, keep the top ratio",
        paper="arXiv 2410.02396",
        check_recipe=recipe_wide(("density", "clamp"), when=("scope", "model")),
        needs=(WholeModelStatistic(model_scope_stats),),
    )
)
