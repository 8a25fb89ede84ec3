"""Diagonal Fisher information of a causal LM, from per-example gradients (arXiv 2111.09832).

Three variants, each a mean over examples of a per-example diagonal, summed over the example's
scored positions (its answer tokens: the same tokens, with no end-of-sequence token, that
evaluation scores):

- ``exact``: sum_t sum_y p_t(y) (d log p_t(y))^2, the expectation over the model's own
  predictive distribution at every scored position given the true prefix (the paper's Fisher;
  its code sums over a classifier's classes). Computed without enumerating the vocabulary:
  with h_t the input of the output layer (logits z_t = W h_t + b), the gradient of
  log p_t(y) is J_t^T W^T (e_y - p_t) with J_t = dh_t/dtheta, so the sum over y is
  diag(J_t^T C_t J_t) with C_t = W^T (diag(p_t) - p_t p_t^T) W (hidden x hidden). C_t = L L^T
  by its eigendecomposition (eigenvalues below the float32 rank tolerance dropped), and the
  Fisher is the sum of (J_t^T l)^2 over L's columns: one backward per column, batched. The
  output layer's own Fisher is closed-form, sum_t p_t (1 - p_t) h_t^2 (outer). Cost per
  example: sum over scored positions of rank(C_t) <= min(hidden, vocab) backward passes
  through the model, ``CHUNK`` of them at a time (memory: CHUNK gradients of the parameters).
  A tied or non-linear output layer takes C_t = diag(p_t) - p_t p_t^T on the logits instead
  (rank up to the vocabulary).
- ``sampled``: ``draws`` labels per scored position drawn from p_t (each draw one backward of
  the summed log-probabilities), squared gradients averaged over draws: an unbiased estimate
  of ``exact``, which for a confident model needs many draws (one draw almost always hits the
  top token, whose gradient is near zero).
- ``empirical``: the data's own answer tokens as labels (one backward).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from amalgam.methods.svd import numerical_rank
from amalgam.statistics.data import Encoded
from amalgam.statistics.settings import DEFAULT_DRAWS, VARIANTS

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CHUNK = 256  # batched backward passes of the exact Fisher at a time (cut to fit MAX_FLOATS)
MAX_FLOATS = 1 << 27  # gradient floats held at once by one batched backward (512 MiB)


def fisher_diagonal(
    model: PreTrainedModel,
    examples: Sequence[Encoded],
    variant: str,
    seed: int = 0,
    draws: int = DEFAULT_DRAWS,
) -> tuple[dict[str, torch.Tensor], int]:
    """Mean over examples of each example's diagonal Fisher (see the module docstring), per
    parameter. Batch of one: each gradient is the example's own, not a batch mean's.
    Returns (parameter name -> float32 Fisher, examples used)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown Fisher variant {variant!r}")
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    for p in params.values():
        p.requires_grad_(True)
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    device = next(iter(params.values())).device
    generator = torch.Generator().manual_seed(seed)
    head = _untied_linear_head(model, params)
    used = 0
    model.eval()
    for ex in examples:
        if ex.start >= len(ex.ids):
            continue
        ids = torch.tensor([ex.ids], device=device)
        with torch.enable_grad():
            if variant == "exact":
                _exact(model, head, params, sums, ids, ex.start)
            else:
                _drawn(model, params, sums, ids, ex.start, variant, generator, draws)
        used += 1
    for s in sums.values():
        s /= max(used, 1)
    return sums, used


def _untied_linear_head(
    model: PreTrainedModel, params: dict[str, torch.Tensor]
) -> torch.nn.Linear | None:
    """The output layer when it is a Linear whose weight no other module uses, else None."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return None
    own = {id(head.weight)} | ({id(head.bias)} if head.bias is not None else set())
    named = {id(p) for p in params.values()}
    users = sum(1 for m in model.modules() for p in m.parameters(recurse=False) if id(p) in own)
    return head if own <= named and users == len(own) else None


def _accumulate(
    params: dict[str, torch.Tensor], sums: dict[str, torch.Tensor], grads: tuple, batched: bool
) -> None:
    for name, g in zip(params, grads, strict=True):
        if g is not None:
            g = g.float()
            sums[name] += g.pow(2).sum(0) if batched else g.pow(2)


def _drawn(
    model: PreTrainedModel,
    params: dict[str, torch.Tensor],
    sums: dict[str, torch.Tensor],
    ids: torch.Tensor,
    start: int,
    variant: str,
    generator: torch.Generator,
    draws: int,
) -> None:
    logp = torch.log_softmax(model(input_ids=ids).logits[0, start - 1 : -1].float(), dim=-1)
    rounds = 1 if variant == "empirical" else draws
    probs = logp.detach().exp().cpu()
    for k in range(rounds):
        if variant == "empirical":
            targets = ids[0, start:]
        else:
            targets = torch.multinomial(probs, 1, generator=generator)[:, 0].to(ids.device)
        loss = logp.gather(1, targets[:, None]).sum() / rounds**0.5
        grads = torch.autograd.grad(
            loss, list(params.values()), allow_unused=True, retain_graph=k + 1 < rounds
        )
        _accumulate(params, sums, grads, batched=False)


def _exact(
    model: PreTrainedModel,
    head: torch.nn.Linear | None,
    params: dict[str, torch.Tensor],
    sums: dict[str, torch.Tensor],
    ids: torch.Tensor,
    start: int,
) -> None:
    captured: list[torch.Tensor] = []
    hook = None
    if head is not None:
        hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        logits = model(input_ids=ids).logits
    finally:
        if hook is not None:
            hook.remove()
    probs = torch.softmax(logits[0, start - 1 : -1].detach().float(), dim=-1)  # (T, V)
    if head is None:  # factor the covariance on the logits themselves
        point, w, rest = logits, None, params
    else:
        point, w = captured[0], head.weight.detach().float()
        rest = {n: p for n, p in params.items() if p is not head.weight and p is not head.bias}
        h = point[0, start - 1 : -1].detach().float()
        var = probs * (1 - probs)
        for name, p in params.items():
            if p is head.weight:
                sums[name] += var.T @ h.pow(2)
            elif p is head.bias:
                sums[name] += var.sum(0)
    directions = []  # (position in the sequence, one backward direction there)
    for t, p in enumerate(probs):
        if w is None:
            cov = torch.diag(p) - torch.outer(p, p)
        else:
            mean = w.T @ p
            cov = (w.T * p) @ w - torch.outer(mean, mean)
        lam, vec = torch.linalg.eigh(cov)
        lam, vec = lam.flip(0).clamp_min(0), vec.flip(1)
        r = numerical_rank(lam, (cov.shape[0], cov.shape[0]))
        factor = (vec[:, :r] * lam[:r].sqrt()).T  # (r, width)
        directions += [(start - 1 + t, row) for row in factor]
    size = sum(p.numel() for p in rest.values())
    chunk = max(1, min(CHUNK, MAX_FLOATS // max(size, 1)))
    for first in range(0, len(directions), chunk):
        part = directions[first : first + chunk]
        cotangents = torch.zeros(len(part), *point.shape, dtype=point.dtype, device=point.device)
        for j, (position, row) in enumerate(part):
            cotangents[j, 0, position] = row
        grads = torch.autograd.grad(
            point,
            list(rest.values()),
            grad_outputs=cotangents,
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
        _accumulate(rest, sums, grads, batched=True)
