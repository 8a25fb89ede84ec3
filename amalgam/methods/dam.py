"""DAM, Defense-Aware Merging: task arithmetic inside a task-shared, safety-aware subspace
learned from unlabelled data ("Mitigating the Backdoor Effect for Multi-Task Model Merging via
Safety-Aware Subspace", Yang et al., ICLR 2025, arXiv 2410.13910).

Two Concrete (relaxed-Bernoulli) masks over the task vectors are learned by alternating
updates (``amalgam.statistics.dam_masks``): a task-shared mask m_s (one for all models) that
minimises the merged model's prediction entropy on the models' unlabelled prompts, as Concrete
subspace learning (arXiv 2312.06173); and a backdoor-detection mask m_b,i per model that
minimises that entropy plus ``adv_weight`` times a safety loss, the merged model's disagreement
between a prompt with an inverted trigger and the same prompt without it. The merge is then
one per-tensor pass: W = W0 + lambda * sum_i w_i M_i * (W_i - W0), where M_i is model i's mask
(1 where neither m_s's nor m_b,i's logit fell below -``drop``, else 0). Entries the losses
push out of the subspace (the backdoor-relevant ones) are not merged.

Deviations from the paper and its released code (every one):
- Text models: the trigger inversion is discrete. The paper optimises a universal additive
  image perturbation per task with Adam; amalgam scores every vocabulary token put in front
  of each model's prompts (the trigger position it searches: a one-token prefix) on the
  current merge and keeps, per model's data, the ``triggers`` tokens that pull the most
  predictions onto one answer, re-searched every ``search_every`` steps.
- The safety loss is the cross-entropy between the triggered prediction and the clean
  prediction's argmax (the released code's trigger-search objective), minimised over the
  detection masks (the released code instead adds the entropy on perturbed inputs).
- Entropy is taken over the next-token distribution after each prompt (the paper: over a
  classifier head's classes).
- lambda is fixed (Concrete TA form); the paper's inner AdaMerging step on lambda is not run.
- The final mask is deterministic and binary: an entry is merged (at weight 1) unless its
  shared or detection logit ended below -``drop``; the paper samples one relaxed mask.
- Mask logits learn at ``lr`` (default 0.05, the paper 1e-3 over 1000-2000 steps on ViT-B/32)
  for ``steps`` (default 100): the small zoo needs far fewer steps; ``adv_weight`` defaults to
  1 (the paper's 0.1 left the zoo's backdoor in place).
- A token counts as an inverted trigger only where it moves at least ``min_gain`` of a model's
  prompts onto one answer (the paper has no such test: its perturbation is always used).
Not streamed: the learning holds the base, every task vector and the mask logits with their
Adam state in memory, about (4N + 4) x P floats for N models of P parameters; the merge
itself streams per tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from amalgam.errors import MergeError
from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register
from amalgam.methods.needs import LearnedStatistics
from amalgam.methods.params import recipe_wide
from amalgam.methods.task_vectors import LAMBDA, WEIGHT

if TYPE_CHECKING:
    from amalgam.statistics.artifact import StatisticsInfo

#: Parameters read by the learning step: one value for the whole recipe.
LEARNING = (
    "steps",
    "lr",
    "temperature",
    "adv_weight",
    "perf_weight",
    "triggers",
    "min_gain",
    "search_every",
    "batch_size",
    "samples",
    "drop",
)


def dam_merge(
    base: torch.Tensor | None, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    """W0 + lambda * sum_i w_i M_i (W_i - W0), in float32; M_i is model i's learned mask."""
    if base is None:
        raise MergeError(f"tensor '{ctx.name}': DAM merges task vectors and needs a base")
    w0 = base.float()
    out = torch.zeros_like(w0)
    for x, mask, w in zip(inputs, ctx.model_stats, p.each("weight"), strict=True):
        if mask is None:
            raise MergeError(f"tensor '{ctx.name}': a model's DAM mask artifact lacks it")
        out.add_(mask.float() * (x.float() - w0), alpha=float(w))
    return w0 + float(p.shared["lambda"]) * out


def _learn(recipe: Any, inputs: dict[str, Any], device: str) -> tuple[StatisticsInfo, ...]:
    from amalgam.statistics.dam_masks import learn_masks  # lazy: runs models

    return learn_masks(recipe, inputs, device)


register(
    Method(
        name="dam",
        fn=dam_merge,
        params=(
            WEIGHT,
            Param("lambda", 0.3, LAMBDA.help),
            Param("steps", 100, "mask-learning steps", kind=int, low=1, gradient=False),
            Param("lr", 0.05, "Adam learning rate of the mask logits", low=0.0, low_open=True),
            Param("temperature", 0.5, "Concrete temperature", low=0.0, low_open=True),
            Param(
                "drop",
                1.5,
                "an entry leaves the merge where a mask logit ends below -drop",
                low=0.0,
            ),
            Param("adv_weight", 1.0, "weight of the safety loss (the paper: 0.1)", low=0.0),
            Param("perf_weight", 1.0, "weight of the entropy (performance) loss", low=0.0),
            Param("triggers", 1, "inverted trigger tokens kept", kind=int, low=1, gradient=False),
            Param(
                "min_gain",
                0.4,
                "share of a model's prompts a token must pull onto one answer to count as a "
                "trigger",
                low=0.0,
                high=1.0,
            ),
            Param(
                "search_every",
                50,
                "steps between trigger searches",
                kind=int,
                low=1,
                gradient=False,
            ),
            Param("batch_size", 32, "prompts per step", kind=int, low=1, gradient=False),
            Param(
                "samples",
                256,
                "prompts of each model's data used",
                kind=int,
                low=1,
                gradient=False,
            ),
        ),
        summary="task arithmetic inside a learned task-shared and backdoor-free subspace "
        "(masks learned on unlabelled prompts against inverted triggers)",
        paper="arXiv 2410.13910",
        check_recipe=recipe_wide(LEARNING),
        needs=(LearnedStatistics(_learn),),
    )
)
