"""Score one model: run it on evaluation tasks (lm-eval, or the in-process quick scorer that
scores the same way; encoders on embedding tasks: :mod:`amalgam.evaluate.embedding`; a
Twin-Merging folder per input: :mod:`amalgam.twin.model`) and keep
each example's correctness, its text log-likelihood, and its attack success rate on task
folders that declare a backdoor trigger (:mod:`amalgam.evaluate.backdoor`)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amalgam import storage
from amalgam.device import load_causal_lm
from amalgam.evaluate.backdoor import backdoor_tasks, quick_attack_success
from amalgam.evaluate.catalog import folder_task
from amalgam.evaluate.embedding import score_embedding_tasks, uses_embedding_scorer
from amalgam.evaluate.harness import evaluate_tasks, torch_dtype
from amalgam.evaluate.perplexity import sequence_nll, task_texts, token_ids
from amalgam.evaluate.quick import choice_correct
from amalgam.evaluate.results import ModelResult
from amalgam.evaluate.taskdir import EvaluationError, read_split

if TYPE_CHECKING:
    from amalgam.recipe import EvaluateSpec


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
    with ``perplexity``, also its log-likelihood of the texts of those tasks that are task
    folders of ``spec.tasks_dir`` (none when no task is: then ``nll`` stays None). A causal
    LM also gets its attack success rate on the tasks whose folder holds ``backdoor.json``
    (same split and limit, the quick scorer's choice scoring)."""
    dtype = torch_dtype(spec.dtype, spec.device)
    with local_model(uri, **storage_options) as folder:
        tasks_dir = Path(spec.tasks_dir) if spec.tasks_dir else None
        if (folder / "twin.json").is_file():  # Twin-Merging: each example its own mix
            if tasks_dir is None:
                raise EvaluationError(f"{uri}: a Twin-Merging folder is scored on task folders")
            from amalgam.twin.model import twin_correct  # lazy: torch

            correct = twin_correct(
                folder, tasks_dir, tasks, split=spec.split, limit=spec.limit, device=spec.device
            )
            return ModelResult.from_correct(uri, correct)
        if uses_embedding_scorer(folder, tasks_dir, tasks):  # encoders have no perplexity
            assert tasks_dir is not None  # embedding tasks are folders of tasks_dir
            scores = score_embedding_tasks(
                folder,
                tasks_dir,
                tasks,
                split=spec.split,
                limit=spec.limit,
                device=spec.device,
                batch_size=spec.batch_size if isinstance(spec.batch_size, int) else 32,
            )
            return ModelResult(uri=uri, tasks=scores)
        if spec.engine == "lm_eval":
            result = ModelResult(uri=uri, tasks=evaluate_tasks(folder, spec, tasks))
            model = tokenizer = None
        else:
            model, tokenizer = load_causal_lm(folder, spec.device, dtype)
            result = ModelResult.from_correct(uri, _quick_correct(model, tokenizer, spec, tasks))
        texts = [t for t in tasks if folder_task(spec, t)]
        triggered = backdoor_tasks(tasks_dir, tasks) if tasks_dir else {}
        if ((perplexity and texts) or triggered) and model is None:
            model, tokenizer = load_causal_lm(folder, spec.device, dtype)
        if perplexity and texts:
            result.nll, result.tokens = _text_nll(model, tokenizer, spec, texts)
        if triggered:
            assert tasks_dir is not None
            result.attack_success = quick_attack_success(
                model, tokenizer, tasks_dir, list(triggered), split=spec.split, limit=spec.limit
            )
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
