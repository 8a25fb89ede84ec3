"""AdaMerging: task-wise or layer-wise task-arithmetic coefficients learned by entropy
minimisation on unlabelled inputs (Yang et al., arXiv 2310.02575).

theta(lambda) = base + sum_k clamp(lambda_k[t], 0, 1) tau_k[t]: one lambda per task vector
(``granularity: task``) or per task vector and tensor (``layer``: the official code's "layer"
is each state-dict entry, so a module's weight and bias get their own). Each step draws a batch
of ``batch_size`` prompts from every model's ``data`` (labels and answers never read), rebuilds
the merged tensors from lambda, runs the base model with them through
``torch.func.functional_call``, and takes one Adam step (lr 1e-3, betas 0.9/0.999) on the sum
over models of the mean prediction entropy; ``steps`` (500) such steps from lambda = 0.3, the
clamp applied where lambda is used (zero gradient outside [0, 1]). The learned table is a
hash-keyed artifact (``amalgam.statistics.learning``); the merge is then a per-tensor pass.

Deviations: a causal LM has no classifier head, so the entropy is that of the next-token
distribution (whole vocabulary) after each prompt, i.e. at the first answer position; the
paper's image classifiers use their task heads' class distribution. One batch per model per
step (the official loop takes two). A merged tensor the base model does not hold as a
parameter (a stored buffer) takes each model's mean coefficient.

Memory: the learning holds the base model, the K task vectors of every learned tensor and one
merged copy in float32, plus one forward/backward per model's batch: about (K + 2) x P floats
(P: one model's parameters) + activations; it does not stream (the entropy's gradient needs the
whole merged model). The merge afterwards streams tensor by tensor."""

from __future__ import annotations

from typing import Any

import torch

from amalgam.errors import MergeError
from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.fisher import SAMPLES
from amalgam.methods.needs import LearnedCoefficients
from amalgam.methods.params import recipe_wide
from amalgam.statistics.learning import (
    LEARNED_KEY,
    Learned,
    Problem,
    Sampler,
    merged,
    task_loss,
)

GRANULARITY = Param(
    "granularity",
    "layer",
    "one coefficient per task vector (task) or per task vector and tensor (layer)",
    kind=str,
    choices=("layer", "task"),
    gradient=False,
)
INIT = Param("init", 0.3, "initial value of every coefficient", low=0.0, high=1.0, gradient=False)
LR = Param(
    "lr", 1e-3, "Adam learning rate of the coefficients", low=0.0, low_open=True, gradient=False
)
STEPS = Param("steps", 500, "Adam steps on the coefficients", kind=int, low=1, gradient=False)
BATCH = Param(
    "batch_size", 16, "prompts of each model's data per step", kind=int, low=1, gradient=False
)
#: The parameters every learning method shares; they take one value for the whole recipe.
LEARNING = (SAMPLES, BATCH)


def learned_merge(
    base: torch.Tensor | None, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    """theta = base + sum_k c_k (m ⊙ tau_k) in float32, c_k this tensor's learned coefficients
    (``ctx.stats``) and m its learned mask (the plan's learned artifact; 1 without one)."""
    table = ctx.stats.get(LEARNED_KEY, {})
    if base is None or ctx.name not in table:
        raise MergeError(f"tensor '{ctx.name}': no learned coefficients for it")
    w0 = base.float()
    delta = torch.zeros_like(w0)
    for x, c in zip(inputs, table[ctx.name], strict=True):
        delta.add_(x.float() - w0, alpha=c)
    mask = ctx.model_stats[0] if ctx.model_stats else None
    return w0 + (delta if mask is None else delta.mul_(mask.float()))


def learn_coefficients(
    problem: Problem,
    settings: dict[str, Any],
    seed: int,
    masks: dict[str, torch.Tensor] | None = None,
    steps: int | None = None,
) -> torch.Tensor:
    """Adam on the raw coefficients (init ``init``), clamped to [0, 1] where they are used, so
    the gradient is zero outside; one batch of each model's prompts per step, the loss the sum
    over models of the mean entropy. Returns the clamped (rows, K) table: rows = 1 (task-wise)
    or one per learned tensor (layer-wise)."""
    rows = len(problem.names) if settings["granularity"] == "layer" else 1
    device = next(iter(problem.base.values())).device
    lam = torch.full((rows, problem.k), float(settings["init"]), device=device)
    lam.requires_grad_(True)
    opt = torch.optim.Adam([lam], lr=float(settings["lr"]))
    sampler = Sampler(problem.tasks, settings["batch_size"], problem.pad_id, seed)
    for _ in range(steps or settings["steps"]):
        opt.zero_grad()
        task_loss(problem, sampler, merged(problem, lam.clamp(0.0, 1.0), masks)).backward()
        opt.step()
    return lam.detach().clamp(0.0, 1.0)


def learn_adamerging(problem: Problem, settings: dict[str, Any], seed: int) -> Learned:
    return Learned(learn_coefficients(problem, settings, seed))


def adamerging_settings(shared: dict[str, Any]) -> dict[str, Any]:
    names = ("granularity", "init", "lr", "steps", "batch_size", "samples")
    return {n: shared[n] for n in names}


register(
    Method(
        name="adamerging",
        fn=learned_merge,
        params=(GRANULARITY, INIT, LR, STEPS, *LEARNING),
        summary="task arithmetic with coefficients (per task, or per task and tensor) learned "
        "by minimising the merged model's prediction entropy on unlabelled prompts",
        paper="arXiv 2310.02575",
        check_recipe=recipe_wide(("granularity", "init", "lr", "steps", "batch_size", "samples")),
        needs=(LearnedCoefficients(adamerging_settings, learn_adamerging),),
    )
)
