"""Metrics over per-example correctness: accuracy, normalized accuracy, flips, perplexity ratio.

Definitions (see the evaluation section of the project's reference notes):

- normalized accuracy NA_t = acc(candidate, t) / acc(expert_t, t) (TA/TIES/TALL-masks usage),
  undefined when the expert scores 0;
- negative flip rate NFR = (1/N) sum_i c_i(old) (1 - c_i(new)), the share of examples the old
  model (the champion) got right and the new one gets wrong; positive flip rate likewise
  (Yan et al. 2021, as used by MUSCLE, arXiv 2407.09435). acc_new - acc_old = PFR - NFR;
- perplexity ratio rho = PPL(candidate) / PPL(reference), a collapse check (Yang et al.,
  "The Butterfly Effect of Model Editing", arXiv 2402.09656).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from pydantic import BaseModel, computed_field

from amalgam.errors import AmalgamError


class MetricError(AmalgamError):
    """Per-example results that cannot be compared (different lengths, nothing to score)."""


class Flips(BaseModel):
    """How a new model's per-example correctness differs from an old model's on one task."""

    n: int
    negative: list[int]  # example indices: old right, new wrong
    positive: list[int]  # example indices: old wrong, new right

    @computed_field
    @property
    def negative_flip_rate(self) -> float:
        return len(self.negative) / self.n if self.n else 0.0

    @computed_field
    @property
    def positive_flip_rate(self) -> float:
        return len(self.positive) / self.n if self.n else 0.0


def accuracy(correct: Sequence[bool]) -> float:
    """Share of examples answered correctly."""
    if not correct:
        raise MetricError("accuracy of no examples")
    return sum(map(bool, correct)) / len(correct)


def normalized_accuracy(
    acc: float, expert_acc: float, higher_is_better: bool = True
) -> float | None:
    """acc / expert_acc (expert_acc / acc for a lower-is-better score such as perplexity, so
    that 1 means "as good as the expert" either way); None when the ratio is undefined."""
    num, den = (acc, expert_acc) if higher_is_better else (expert_acc, acc)
    return num / den if den > 0 else None


def mean_defined(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def flips(old: Sequence[bool], new: Sequence[bool], task: str = "task") -> Flips:
    """Negative and positive flips from ``old`` to ``new`` (same examples, same order)."""
    if len(old) != len(new):
        raise MetricError(
            f"{task}: the old model has {len(old)} results and the new one {len(new)}; "
            "flips need the same examples"
        )
    negative = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a and not b]
    positive = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if b and not a]
    return Flips(n=len(old), negative=negative, positive=positive)


def pooled_negative_flip_rate(per_task: Mapping[str, Flips]) -> float:
    """Negative flips over every example of every task (tasks weigh by their size)."""
    n = sum(f.n for f in per_task.values())
    if not n:
        raise MetricError("negative flip rate of no examples")
    return sum(len(f.negative) for f in per_task.values()) / n


def perplexity(nll: float, tokens: int) -> float:
    """exp(total negative log-likelihood / predicted tokens)."""
    if tokens <= 0:
        raise MetricError("perplexity of no tokens")
    return math.exp(nll / tokens)


def perplexity_ratio(candidate: float, reference: float) -> float:
    """PPL(candidate) / PPL(reference): above 1 the candidate models the text worse."""
    return candidate / reference
