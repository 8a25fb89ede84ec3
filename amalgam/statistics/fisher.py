"""Diagonal Fisher information of a causal LM, from per-example gradients (arXiv 2111.09832)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from amalgam.statistics.data import Encoded
from amalgam.statistics.settings import VARIANTS

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def fisher_diagonal(
    model: PreTrainedModel, examples: Sequence[Encoded], variant: str, seed: int = 0
) -> tuple[dict[str, torch.Tensor], int]:
    """Mean over examples of the squared gradient of log p(targets | prefix), per parameter.

    One forward and backward pass per example (batch of one: the gradient is the example's
    own, not a batch mean's). The targets are the scored tokens of the example: the data's own
    tokens (``empirical``), or tokens drawn from the model's predictive distribution at each
    scored position given the true prefix (``sampled``, one draw per example; its expectation is
    the sum over positions of each position's exact Fisher, the paper's model-distribution
    Fisher taken token by token). Returns (parameter name -> float32 Fisher, examples used).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown Fisher variant {variant!r}")
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    for p in params.values():
        p.requires_grad_(True)
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    device = next(iter(params.values())).device
    generator = torch.Generator().manual_seed(seed)
    used = 0
    model.eval()
    for ex in examples:
        if ex.start >= len(ex.ids):
            continue
        ids = torch.tensor([ex.ids], device=device)
        with torch.enable_grad():
            logits = model(input_ids=ids).logits[0, ex.start - 1 : -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            if variant == "empirical":
                targets = ids[0, ex.start :]
            else:
                probs = logp.detach().exp().cpu()
                targets = torch.multinomial(probs, 1, generator=generator)[:, 0].to(device)
            loss = logp.gather(1, targets[:, None]).sum()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, g in zip(params, grads, strict=True):
            if g is not None:
                sums[name].addcmul_(g.float(), g.float())
        used += 1
    for s in sums.values():
        s /= max(used, 1)
    return sums, used
