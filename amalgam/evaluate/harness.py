"""Offline lm-eval accuracy of a local model folder (or PEFT adapter folder) on local tasks.

Splits: each task folder holds one lm-eval task per split (see `taskdir`): `<task>` scores the
test split and `<task>_val` the validation split. `evaluate_model(..., split="validation")`
runs the `_val` tasks and reports them under the plain task names, so that hyper-parameter
search on validation and the final report on test use the same code and the same keys.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from amalgam.device import pick_device
from amalgam.evaluate.taskdir import EvaluationError, check_tasks, list_tasks

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class _DropCustomDatasetNotice(logging.Filter):
    """lm-eval warns, once per task, that `custom_dataset` loaders can take `--metadata`
    arguments: true, but irrelevant to the zoo's loader, which takes none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextmanager
def quiet_custom_dataset_notice() -> Iterator[None]:
    logger, notice_filter = logging.getLogger("lm_eval.api.task"), _DropCustomDatasetNotice()
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)


def model_args(model: Path) -> dict[str, str]:
    """lm-eval `hf` arguments for a model folder, or for a PEFT adapter folder on its base."""
    if (model / "config.json").is_file():
        return {"pretrained": str(model), "dtype": "float32"}
    adapter_config = model / "adapter_config.json"
    if adapter_config.is_file():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            raise EvaluationError(f"{adapter_config}: base model {base!r} is not a local folder")
        return {"pretrained": base, "peft": str(model), "dtype": "float32"}
    raise EvaluationError(f"{model}: neither a model folder nor a PEFT adapter folder")


def evaluate_model(
    model: str | Path,
    tasks_dir: Path,
    tasks: list[str] | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
    split: str = "test",
) -> dict[str, float]:
    """Task -> accuracy (lm-eval `acc`) of `model` on `split` ('test' or 'validation') of the
    tasks in `tasks_dir` (all of them when `tasks` is None), on at most `limit` examples each.
    Runs offline: nothing is downloaded."""
    results, names = _simple_evaluate(
        model, tasks_dir, tasks, limit, batch_size, device, split, log_samples=False
    )
    return {task: float(results["results"][name]["acc,none"]) for task, name in names.items()}


def evaluate_model_samples(
    model: str | Path,
    tasks_dir: Path,
    tasks: list[str] | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
    split: str = "test",
) -> dict[str, list[bool]]:
    """Task -> per-example correctness (lm-eval's logged samples, in record order) on the
    same requests as :func:`evaluate_model`; the mean of each list is that task's `acc`."""
    results, names = _simple_evaluate(
        model, tasks_dir, tasks, limit, batch_size, device, split, log_samples=True
    )
    out = {}
    for task, name in names.items():
        samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        out[task] = [bool(s["acc"]) for s in samples]
    return out


def _simple_evaluate(
    model: str | Path,
    tasks_dir: Path,
    tasks: list[str] | None,
    limit: int | None,
    batch_size: int,
    device: str,
    split: str,
    log_samples: bool,
) -> tuple[dict, dict[str, str]]:
    """lm-eval's results and the task -> lm-eval task name map."""
    model, tasks_dir = Path(model), Path(tasks_dir)
    target = str(pick_device(device))
    tasks = list_tasks(tasks_dir) if tasks is None else list(tasks)
    names = check_tasks(tasks_dir, tasks, split)
    args = model_args(model)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    # lazy: lm-eval takes seconds to import and must see the offline settings above first
    import lm_eval
    from lm_eval.tasks import TaskManager  # lazy: as above

    with quiet_custom_dataset_notice():
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=args,
            tasks=names,
            task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
            device=target,
            batch_size=batch_size,
            limit=limit,
            log_samples=log_samples,
            bootstrap_iters=0,
        )
    if results is None:
        raise EvaluationError(f"{model}: lm-eval returned no results")
    return results, dict(zip(tasks, names, strict=True))
