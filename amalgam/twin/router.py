"""Twin-Merging's router: which tasks an input looks like, from the shared model's sentence
representation (mean last hidden state over the prompt), as softmax weights over tasks.

The paper's router is a small MLP trained on each task's data; this one is multinomial
logistic regression on standardised features (a linear layer, zero-initialised, full-batch
Adam, so the same data gives the same bits), a few CPU seconds on the tiny zoo.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Router:
    """Softmax(W (x - mean) / std + b) over ``tasks``."""

    tasks: tuple[str, ...]
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """Per row of ``features``: mixing weights over tasks (rows sum to 1)."""
        return torch.softmax(self.logits(features), dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}

    @classmethod
    def from_tensors(cls, tasks: Sequence[str], t: dict[str, torch.Tensor]) -> Router:
        return cls(tuple(tasks), t["mean"], t["std"], t["weight"], t["bias"])


def train_router(
    features: torch.Tensor, labels: torch.Tensor, tasks: Sequence[str], *, steps: int = 300
) -> Router:
    """Fit the router to ``features`` (n x d) labelled with task indices ``labels`` (n)."""
    mean = features.mean(0)
    std = features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    weight = torch.zeros(len(tasks), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(tasks), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, labels)
        loss.backward()
        optimizer.step()
    return Router(tuple(tasks), mean, std, weight.detach(), bias.detach())


def prompt_features(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 256
) -> torch.Tensor:
    """Mean of the model's last hidden state over each prompt's tokens (n x hidden)."""
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id or 0
    out = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for first in range(0, len(rows), batch_size):
            chunk = rows[first : first + batch_size]
            ids = torch.full((len(chunk), max(len(r) for r in chunk)), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(chunk):
                ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
            hidden = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True
            ).hidden_states[-1]
            m = mask.to(device).unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * m).sum(1) / m.sum(1)).float().cpu())
    return torch.cat(out)
