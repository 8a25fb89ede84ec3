"""What scoring a model gives: per task its primary score and per-example correctness, per
model those tasks and its text log-likelihood (shared by every scorer and the report)."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, Field, computed_field

from amalgam.evaluate import metrics as metric


class TaskResult(BaseModel):
    """One model on one task: its score and each example's correctness, in record order.

    ``accuracy`` holds the task's primary score, named by ``metric`` (``acc`` for multiple
    choice, ``exact_match`` for generation, ``ndcg@10`` for retrieval...); ``higher_is_better``
    is False for perplexity-like scores. ``correct`` is empty where the metric has no
    per-example pass or fail (perplexity, correlations): such a task has no flips.
    """

    accuracy: float
    correct: list[bool]
    metric: str = "acc"
    higher_is_better: bool = True


class ModelResult(BaseModel):
    """One model's results per task, its text log-likelihood when measured, and its attack
    success rate on the task folders that declare a backdoor trigger (task -> ASR)."""

    uri: str
    tasks: dict[str, TaskResult]
    nll: float | None = None
    tokens: int | None = None
    attack_success: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def from_correct(
        cls,
        uri: str,
        correct: Mapping[str, list[bool]],
        nll: float | None = None,
        tokens: int | None = None,
    ) -> ModelResult:
        """Results from per-example correctness per task."""
        tasks = {
            t: TaskResult(accuracy=metric.accuracy(c), correct=list(c)) for t, c in correct.items()
        }
        return cls(uri=uri, tasks=tasks, nll=nll, tokens=tokens)

    @computed_field
    @property
    def perplexity(self) -> float | None:
        return (
            None
            if self.nll is None or not self.tokens
            else metric.perplexity(self.nll, self.tokens)
        )
