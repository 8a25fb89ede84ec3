"""Gram matrices of every linear layer's inputs, and the input embedding's token shares, for
RegMean (arXiv 2212.09849)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from amalgam.statistics.data import Encoded

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def input_embedding(
    model: PreTrainedModel, linears: dict[str, torch.nn.Linear]
) -> tuple[str, torch.nn.Embedding] | None:
    """(weight name, module) of the model's input embedding, unless it has none, it is not a
    ``torch.nn.Embedding``, or its weight is shared with a linear layer (tied word embeddings:
    that tensor is merged as the linear layer)."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, torch.nn.Embedding):
        return None
    ptr = emb.weight.data_ptr()
    if any(m.weight.data_ptr() == ptr for m in linears.values()):
        return None
    name = next(n for n, m in model.named_modules() if m is emb)
    return f"{name}.weight", emb


def gram_matrices(
    model: PreTrainedModel, examples: Sequence[Encoded], pad_id: int, batch_size: int = 16
) -> tuple[dict[str, torch.Tensor], int]:
    """G = X^T X / T for each ``torch.nn.Linear`` (``lm_head`` included), keyed by its weight's
    name: X holds the layer's input at every real token of every example (padding masked out,
    a deliberate departure from the official code, which also counts padding), T the token
    count (the per-token mean all reference implementations keep). Accumulated in float64.

    The input embedding is a linear map of one-hot token vectors, so its Gram is diagonal: it
    is kept as a vector of length num_embeddings, each token id's count over the real tokens
    divided by T, keyed by the embedding weight's name (not for an embedding tied to a linear
    layer). Returns (weight name -> float32 statistic, tokens seen)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    device = next(model.parameters()).device
    sums = {
        f"{n}.weight": torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device)
        for n, m in linears.items()
    }
    embedding = input_embedding(model, linears)
    if embedding is not None:
        sums[embedding[0]] = torch.zeros(embedding[1].num_embeddings, dtype=torch.float64)
    mask: list[torch.Tensor] = []

    def hook(name: str):
        def record(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0][mask[0]].double()  # (real tokens, in_features)
            sums[name].addmm_(x.T, x)

        return record

    handles = [m.register_forward_pre_hook(hook(f"{n}.weight")) for n, m in linears.items()]
    tokens = 0
    try:
        model.eval()
        with torch.inference_mode():
            for first in range(0, len(examples), batch_size):
                chunk = examples[first : first + batch_size]
                width = max(len(e.ids) for e in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                real = torch.zeros((len(chunk), width), dtype=torch.bool)
                for row, e in enumerate(chunk):
                    ids[row, : len(e.ids)] = torch.tensor(e.ids)
                    real[row, : len(e.ids)] = True
                mask[:] = [real.to(device)]
                model(input_ids=ids.to(device), attention_mask=real.long().to(device))
                tokens += int(real.sum())
                if embedding is not None:
                    counts = sums[embedding[0]]
                    counts += torch.bincount(ids[real], minlength=len(counts)).double()
    finally:
        for h in handles:
            h.remove()
    return {n: (s / max(tokens, 1)).float() for n, s in sums.items()}, tokens
