"""The linear-mode-connectivity barrier between two models of one shape, measured cheaply:
answer loss of the naive weight average at the midpoint against the two endpoints."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from amalgam.zoo.train import Encoded, collate

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Points of the path t (0 = first model, 1 = second) at which the report measures the loss.
POINTS = (0.0, 0.5, 1.0)


def answer_loss(model: PreTrainedModel, pools: Sequence[Sequence[Encoded]], pad_id: int) -> float:
    """Mean over pools of the mean cross-entropy on each pool's answer tokens."""
    with torch.inference_mode():
        losses = [model(**collate(pool, pad_id)).loss.item() for pool in pools]
    return sum(losses) / len(losses)


def interpolate(first: PreTrainedModel, second: PreTrainedModel, t: float) -> PreTrainedModel:
    """A new model whose every weight is (1 - t) * first + t * second (inputs unchanged)."""
    other = second.state_dict()
    mixed = copy.deepcopy(first)
    mixed.load_state_dict({k: (1 - t) * v + t * other[k] for k, v in first.state_dict().items()})
    return mixed


def barrier(
    first: PreTrainedModel,
    second: PreTrainedModel,
    pools: Sequence[Sequence[Encoded]],
    pad_id: int,
) -> dict[str, object]:
    """Answer loss at each of POINTS and the barrier: loss at t = 0.5 minus the mean of the
    endpoint losses (0 for linearly connected models, large for unrelated ones)."""
    loss = {t: answer_loss(interpolate(first, second, t), pools, pad_id) for t in POINTS}
    return {
        "loss": {str(t): round(v, 4) for t, v in loss.items()},
        "barrier": round(loss[0.5] - (loss[0.0] + loss[1.0]) / 2, 4),
    }
