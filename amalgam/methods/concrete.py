"""Concrete subspace learning: a mask shared by the task vectors, learned through the binary
Concrete (Gumbel-sigmoid) relaxation by minimising the merged model's prediction entropy on
unlabelled prompts (Tang et al., arXiv 2312.06173): ``concrete_ta`` and ``concrete_adamerging``.

Mask: logits l of each merged tensor's shape (shared by the K task vectors), initialised to 0;
a sample is m = sigmoid((log u - log(1 - u) + l) / T), u ~ U(0, 1) from a generator seeded by the
recipe's seed, divided by its own mean per tensor (the reference code's rescaling). The merge
then streams: theta = base + sum_k c_k (m ⊙ tau_k).

- ``concrete_ta``: c_k = ``lambda`` (0.3) fixed; ``steps`` (2000) Adam steps (lr 1e-3) on l,
  each on a fresh sample.
- ``concrete_adamerging`` (the paper's first-order bi-level scheme): each of ``mask_steps``
  (1000) meta-steps samples m; resets the coefficients to ``init`` and takes one Adam step on
  them (lr ``inner_lr`` = 1) with m detached; then one Adam step (lr 1e-3) on l through the
  merge with the updated coefficients (detached) and m. Then m is frozen (one more sample) and
  AdaMerging learns the coefficients over the masked task vectors for ``steps`` (1000) steps.

Deviations: as AdaMerging's (one batch per model per step; entropy of the next-token
distribution after each prompt; see adamerging.py). The merge uses one seeded continuous sample
of the learned mask (the reference code's default evaluation mask), so it is reproducible; the
mask artifact holds K-independent P floats (one model's size)."""

from __future__ import annotations

from typing import Any

import torch

from amalgam.methods.adamerging import (
    GRANULARITY,
    INIT,
    LEARNING,
    LR,
    learn_coefficients,
    learned_merge,
)
from amalgam.methods.base import Method, Param, register
from amalgam.methods.needs import LearnedCoefficients
from amalgam.methods.params import recipe_wide
from amalgam.statistics.learning import Learned, Problem, Sampler, merged, task_loss

TEMPERATURE = Param(
    "temperature", 0.5, "temperature of the Concrete relaxation", low=0.0, low_open=True,
    gradient=False,
)  # fmt: skip
MASK_LR = Param(
    "mask_lr", 1e-3, "Adam learning rate of the mask logits", low=0.0, low_open=True,
    gradient=False,
)  # fmt: skip

INNER_LR = Param(
    "inner_lr", 1.0, "Adam learning rate of the meta-steps' inner coefficient step", low=0.0,
    low_open=True, gradient=False,
)  # fmt: skip
AM_STEPS = Param(
    "steps", 1000, "AdaMerging steps with the mask frozen", kind=int, low=1, gradient=False
)


def sample_mask(
    logits: dict[str, torch.Tensor], temperature: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """One relaxed-Bernoulli sample per tensor, divided by its mean (differentiable in the
    logits); the noise is drawn on the CPU in sorted name order, so the same seed gives the
    same mask on any device."""
    tiny = torch.finfo(torch.float32).tiny
    out = {}
    for name in sorted(logits):
        logit = logits[name]
        u = torch.rand(logit.shape, generator=generator).clamp(tiny, 1.0 - 1e-7).to(logit.device)
        m = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logit) / temperature)
        out[name] = m / m.mean()
    return out


def _logits(problem: Problem) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(b, requires_grad=True) for n, b in problem.base.items()}


def _frozen(logits: dict[str, torch.Tensor], settings: dict, g: torch.Generator) -> dict:
    with torch.no_grad():
        return sample_mask(logits, settings["temperature"], g)


def learn_concrete_ta(problem: Problem, settings: dict[str, Any], seed: int) -> Learned:
    g = torch.Generator().manual_seed(seed)
    logits = _logits(problem)
    opt = torch.optim.Adam(list(logits.values()), lr=float(settings["mask_lr"]))
    sampler = Sampler(problem.tasks, settings["batch_size"], problem.pad_id, seed)
    coefficients = torch.full((1, problem.k), float(settings["lambda"]))
    coefficients = coefficients.to(next(iter(problem.base.values())).device)
    for _ in range(settings["steps"]):
        masks = sample_mask(logits, settings["temperature"], g)
        opt.zero_grad()
        task_loss(problem, sampler, merged(problem, coefficients, masks)).backward()
        opt.step()
    return Learned(coefficients, _frozen(logits, settings, g))


def learn_concrete_adamerging(problem: Problem, settings: dict[str, Any], seed: int) -> Learned:
    g = torch.Generator().manual_seed(seed)
    logits = _logits(problem)
    opt = torch.optim.Adam(list(logits.values()), lr=float(settings["mask_lr"]))
    sampler = Sampler(problem.tasks, settings["batch_size"], problem.pad_id, seed)
    rows = len(problem.names) if settings["granularity"] == "layer" else 1
    device = next(iter(problem.base.values())).device
    for _ in range(settings["mask_steps"]):
        masks = sample_mask(logits, settings["temperature"], g)
        lam = torch.full((rows, problem.k), float(settings["init"]), device=device)
        lam.requires_grad_(True)
        inner = torch.optim.Adam([lam], lr=float(settings["inner_lr"]))
        fixed = {n: m.detach() for n, m in masks.items()}
        task_loss(problem, sampler, merged(problem, lam.clamp(0.0, 1.0), fixed)).backward()
        inner.step()
        opt.zero_grad()
        updated = lam.detach().clamp(0.0, 1.0)
        task_loss(problem, sampler, merged(problem, updated, masks)).backward()
        opt.step()
    masks = _frozen(logits, settings, g)
    return Learned(learn_coefficients(problem, settings, seed, masks), masks)


LEARNED_TA = ("lambda", "temperature", "mask_lr", "steps", "batch_size", "samples")
LEARNED_AM = (
    "granularity", "init", "lr", "inner_lr", "temperature", "mask_lr", "mask_steps", "steps",
    "batch_size", "samples",
)  # fmt: skip


register(
    Method(
        name="concrete_ta",
        fn=learned_merge,
        params=(
            Param("lambda", 0.3, "scale of the masked task vectors' sum", low=0.0, gradient=False),
            TEMPERATURE,
            MASK_LR,
            Param("steps", 2000, "Adam steps on the mask logits", kind=int, low=1, gradient=False),
            *LEARNING,
        ),
        summary="task arithmetic over task vectors masked by a shared Concrete mask learned by "
        "minimising the merged model's prediction entropy on unlabelled prompts",
        paper="arXiv 2312.06173",
        check_recipe=recipe_wide(LEARNED_TA),
        needs=(LearnedCoefficients(lambda s: {n: s[n] for n in LEARNED_TA}, learn_concrete_ta),),
    )
)

register(
    Method(
        name="concrete_adamerging",
        fn=learned_merge,
        params=(
            GRANULARITY,
            INIT,
            LR,
            INNER_LR,
            TEMPERATURE,
            MASK_LR,
            Param("mask_steps", 1000, "meta-steps on the mask", kind=int, low=1, gradient=False),
            AM_STEPS,
            *LEARNING,
        ),
        summary="AdaMerging over task vectors masked by a shared Concrete mask, the mask "
        "meta-learned against the entropy after one inner coefficient step",
        paper="arXiv 2312.06173",
        check_recipe=recipe_wide(LEARNED_AM),
        needs=(
            LearnedCoefficients(lambda s: {n: s[n] for n in LEARNED_AM}, learn_concrete_adamerging),
        ),
    )
)
