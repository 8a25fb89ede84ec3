"""DELLA: magnitude-ranked random drop (MagPrune) of task vectors (arXiv 2406.11617).

As mergekit 0.1.5 defines ``della`` and ``della_linear``: in each row of a task vector (the
last dimension; a 1-D tensor is one row) the entry of rank r (0 = smallest magnitude) of n is
kept with probability ``density - epsilon + 2 epsilon r / (n - 1)``, so small entries are
dropped more often. Survivors are rescaled, weighted, then ``della`` elects a sign and takes
TIES' disjoint mean, ``della_linear`` sums them (task arithmetic). A ``density`` of 1 keeps
everything (no drop, no rescale), as in mergekit.

Deviations, all documented: masks come from amalgam's counter-based draws (one stream per
tensor and model, ``MergeContext.random_key``; entry i's uniform is a pure function of the key
and i, ``counter_random.uniform``), not mergekit's global torch generator, so the kept entries
differ from a mergekit run while their distribution is the same; entries of
equal magnitude are ranked by position (mergekit's argsort orders them arbitrarily); a row of
one entry takes probability ``density`` (mergekit's 0/0 is NaN); a tensor of 3 or more
dimensions is ranked along its last dimension (mergekit: along dimension 1).
``rescale: exact`` divides each survivor by its own keep probability (the paper's rule);
``l1`` matches the tensor's L1 norm (mergekit's rule, what its ``rescale: true`` means).
Memory beyond the inputs: one float32 mask (or factor) per model for the tensor in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from amalgam.errors import MergeError
from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.counter_random import CounterStream
from amalgam.methods.sparsify import row_chunks
from amalgam.methods.task_vectors import (
    CONSENSUS,
    LAMBDA,
    WEIGHT,
    Applier,
    normalize_param,
    task_vector_merge,
)

DENSITY = Param(
    "density",
    0.3,
    "mean keep probability (1: no drop)",
    per_model=True,
    low=0.0,
    high=1.0,
    low_open=True,
)
EPSILON = Param(
    "epsilon",
    0.1,
    "half-width of the keep probabilities around density (smallest to largest magnitude)",
    per_model=True,
    low=0.0,
)
RESCALE = Param(
    "rescale",
    "exact",
    "exact 1/p per survivor (paper), l1 norm match (mergekit), or none",
    kind=str,
    choices=("exact", "l1", "none"),
    gradient=False,
)


def keep_probabilities(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-entry keep probability of [rows, cols] ``magnitudes``, ranked within each row
    (ties by position): density - epsilon for the smallest, density + epsilon for the largest."""
    rows, n = magnitudes.shape
    if n == 1:
        return torch.full_like(magnitudes, density)
    order = magnitudes.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=order.device).expand(rows, n))
    rank_norm = ranks.to(torch.float32) / (n - 1)
    return (density - epsilon) + rank_norm * (2 * epsilon)


def l1_ratio(before: torch.Tensor, after: torch.Tensor) -> float:
    """||before||_1 / ||after||_1, or 1 where either norm is below 1e-7 (mergekit's rule)."""
    b = float(before.abs().sum(dtype=torch.float64))
    a = float(after.abs().sum(dtype=torch.float64))
    return b / a if b >= 1e-7 and a >= 1e-7 else 1.0


def magprune(
    delta: Callable[[], torch.Tensor], i: int, p: TensorParams, ctx: MergeContext
) -> Applier:
    """Draw this model's MagPrune mask for the tensor; return how to apply it to row blocks."""
    density, epsilon = p.per_model[i]["density"], p.per_model[i]["epsilon"]
    if density >= 1.0:
        return lambda chunk, rows: chunk
    if not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise MergeError(
            f"{ctx.name}: model {i}: density {density} +/- epsilon {epsilon} must lie in (0, 1)"
        )
    tv = delta()
    probs = keep_probabilities(tv.abs(), density, epsilon)
    stream, cols = CounterStream(ctx.random_key(i), tv.device), tv.shape[1]
    draws = torch.empty_like(tv)
    for rows in row_chunks(*tv.shape):
        draws[rows] = stream.uniform(rows.start * cols, rows.stop * cols).reshape(-1, cols)
    keep = (draws < probs).to(torch.float32)
    rescale = p.shared["rescale"]
    if rescale == "exact":
        factor = keep.div_(probs)
        return lambda chunk, rows: chunk * factor[rows]
    if rescale == "l1":
        keep.mul_(l1_ratio(tv, tv * keep))
    return lambda chunk, rows: chunk * keep[rows]


def check_epsilon(recipe: Any) -> list[str]:
    """Scalar density/epsilon pairs that mergekit would refuse (checked per tensor at merge)."""
    problems = []
    for i, m in enumerate(recipe.models):
        values = {"density": DENSITY.default, "epsilon": EPSILON.default}
        values |= recipe.params | m.params
        d, e = values["density"], values["epsilon"]
        scalars = isinstance(d, int | float) and isinstance(e, int | float)
        if scalars and d < 1 and not (d - e > 0 and d + e < 1):
            problems.append(f"models[{i}].params: density {d} +/- epsilon {e} must lie in (0, 1)")
    return problems


_COMMON = (WEIGHT, DENSITY, EPSILON, LAMBDA, RESCALE)
register(
    Method(
        name="della",
        fn=partial(task_vector_merge, magprune, True),
        params=(*_COMMON, normalize_param(True), CONSENSUS),
        summary="magnitude-ranked random drop (MagPrune), rescale, then TIES sign election",
        paper="arXiv 2406.11617",
        check_recipe=check_epsilon,
    )
)
register(
    Method(
        name="della_linear",
        fn=partial(task_vector_merge, magprune, False),
        params=(*_COMMON, normalize_param(False)),
        summary="magnitude-ranked random drop (MagPrune), rescale, then task arithmetic",
        paper="arXiv 2406.11617",
        check_recipe=check_epsilon,
    )
)
