"""Karcher mean: the Riemannian mean of the models' directions on the unit sphere (mergekit's
karcher, arXiv 2603.04972).

As mergekit 0.1.5 defines it, per tensor with equal weights 1/N over all models (the base,
if any, is not used): u_i = x_i / |x_i|; models with |x_i| <= tol are left out and the weights
renormalised over the rest; start from the normalised weighted mean of the u_i (the first
u_i if it is under tol), then up to ``max_iter`` Riemannian gradient steps
u <- exp_u(sum_i a_i theta_i / sin theta_i (u_i - cos theta_i u)), stopping when the step's
norm is under tol. The result is u times the mean norm (1/N) sum_i |x_i| over all models.
Computed in float32 (float64 inputs in float64), in mergekit's order of operations; the
iteration needs whole tensors: memory is about 2N float32 copies of the tensor being merged.
"""

from __future__ import annotations

import torch

from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The equal-weight Karcher mean direction of ``tensors``, scaled by their mean norm."""
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [
        torch.zeros_like(t) if n.item() == 0.0 else t / n
        for t, n in zip(tensors, norms, strict=True)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for a, u in zip(weights, points, strict=True):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = points[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for a, u in zip(weights, points, strict=True):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            step += a * (theta / torch.sin(theta)) * (u - cos * mean)
        step_norm = torch.linalg.vector_norm(step)
        if step_norm.item() < tol:
            break
        mean = torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * mean


def karcher(
    base: torch.Tensor | None, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    dtype = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    tensors = [t.to(dtype) for t in inputs]
    if len(tensors) == 1:
        return tensors[0]
    return karcher_mean(tensors, p.shared["max_iter"], p.shared["tol"])


register(
    Method(
        name="karcher",
        fn=karcher,
        params=(
            Param(
                "max_iter", 10, "most Riemannian gradient steps", kind=int, low=0, gradient=False
            ),
            Param("tol", 1e-5, "stop when the step's norm is below this", low=0.0, gradient=False),
        ),
        summary="equal-weight Riemannian (Karcher) mean of the models' directions, times "
        "their mean norm; base unused",
        paper="arXiv 2603.04972 (mergekit karcher)",
        needs_base=False,
        min_models=1,
    )
)
