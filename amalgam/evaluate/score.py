"""Score one model: run it on evaluation tasks (lm-eval, or the in-process quick scorer that
scores the same way; encoders on embedding tasks: :mod:`amalgam.evaluate.embedding`; a
Twin-Merging folder per input: :mod:`amalgam.twin.model`) and keep
each example's correctness, and its text log-likelihood."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, computed_field

from amalgam import storage
from amalgam.device import load_causal_lm
from amalgam.evaluate import metrics as metric
from amalgam.evaluate.harness import evaluate_model_samples
from amalgam.evaluate.perplexity import sequence_nll, task_texts, token_ids
from amalgam.evaluate.quick import choice_correct
from amalgam.evaluate.taskdir import EvaluationError, read_split

if TYPE_CHECKING:
    from amalgam.recipe import EvaluateSpec


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
    """One model's results per task, and its text log-likelihood when measured."""

    uri: str
    tasks: dict[str, TaskResult]
    nll: float | None = None
    tokens: int | None = None

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


@contextlib.contextmanager
def local_model(uri: str, **storage_options: Any) -> Iterator[Path]:
    """A local folder holding the model at ``uri`` (copied to a temporary folder if remote)."""
    fs, path = storage.resolve(uri, **storage_options)
    if storage.is_local(fs):
        if not Path(path).is_dir():
            raise EvaluationError(f"{uri}: no model folder there")
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="amalgam-eval-") as tmp:
        fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        yield Path(tmp)


def score_model(
    uri: str,
    spec: EvaluateSpec,
    tasks: list[str],
    *,
    perplexity: bool = False,
    **storage_options: Any,
) -> ModelResult:
    """Run one model on ``tasks`` as ``spec`` (an :class:`amalgam.recipe.EvaluateSpec`) says;
    with ``perplexity``, also its log-likelihood of the tasks' texts."""
    tasks_dir = Path(spec.tasks_dir)
    with local_model(uri, **storage_options) as folder:
        # lazy: the embedding scorer builds on this module's TaskResult
        from amalgam.evaluate.embedding import score_embedding_tasks, uses_embedding_scorer

        if (folder / "twin.json").is_file():  # Twin-Merging: each example its own mix
            from amalgam.twin.model import twin_correct  # lazy: torch

            correct = twin_correct(
                folder, tasks_dir, tasks, split=spec.split, limit=spec.limit, device=spec.device
            )
            return ModelResult.from_correct(uri, correct)
        if uses_embedding_scorer(folder, tasks_dir, tasks):  # encoders have no perplexity
            scores = score_embedding_tasks(
                folder,
                tasks_dir,
                tasks,
                split=spec.split,
                limit=spec.limit,
                device=spec.device,
                batch_size=spec.batch_size,
            )
            return ModelResult(uri=uri, tasks=scores)
        if spec.engine == "lm_eval":
            correct = evaluate_model_samples(
                folder,
                tasks_dir,
                tasks,
                limit=spec.limit,
                batch_size=spec.batch_size,
                device=spec.device,
                split=spec.split,
            )
            model = tokenizer = None
        else:
            model, tokenizer = load_causal_lm(folder, spec.device)
            correct = _quick_correct(model, tokenizer, spec, tasks)
        result = ModelResult.from_correct(uri, correct)
        if perplexity:
            if model is None:
                model, tokenizer = load_causal_lm(folder, spec.device)
            result.nll, result.tokens = _text_nll(model, tokenizer, spec, tasks)
    return result


def _quick_correct(
    model: Any, tokenizer: Any, spec: EvaluateSpec, tasks: list[str]
) -> dict[str, list[bool]]:
    return {
        task: choice_correct(
            model, tokenizer, read_split(Path(spec.tasks_dir), task, spec.split)[: spec.limit]
        )
        for task in tasks
    }


def _text_nll(
    model: Any, tokenizer: Any, spec: EvaluateSpec, tasks: list[str]
) -> tuple[float, int]:
    pairs = task_texts(Path(spec.tasks_dir), tasks, spec.split, spec.limit)
    return sequence_nll(model, token_ids(tokenizer, pairs), batch_size=spec.batch_size)
