"""Offline lm-eval scores of a local model folder (or PEFT adapter folder) on the tasks an
evaluation names (see `catalog`): each task's primary score and per-example results.

Splits: each task folder of ``tasks_dir`` holds one lm-eval task per split (see `taskdir`):
`<task>` scores the test split and `<task>_val` the validation split. With
``split="validation"`` the `_val` tasks run and are reported under the plain task names, so
that hyper-parameter search on validation and the final report on test use the same code and
the same keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amalgam.device import pick_device
from amalgam.evaluate.catalog import check_generation, load_tasks, primary_metric
from amalgam.evaluate.results import TaskResult
from amalgam.evaluate.taskdir import EvaluationError, list_tasks

if TYPE_CHECKING:
    from amalgam.recipe import EvaluateSpec


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


def torch_dtype(dtype: str, device: str) -> str:
    """The dtype a model is run in: ``auto`` is bfloat16 on CUDA (float16 on a GPU without
    bfloat16) and float32 on the CPU; any other value as given."""
    if dtype != "auto":
        return dtype
    if pick_device(device).type != "cuda":
        return "float32"
    import torch  # lazy: as in pick_device

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def model_args(model: Path, dtype: str = "float32") -> dict[str, str]:
    """lm-eval `hf` arguments for a model folder, or for a PEFT adapter folder on its base."""
    if (model / "config.json").is_file():
        return {"pretrained": str(model), "dtype": dtype}
    adapter_config = model / "adapter_config.json"
    if adapter_config.is_file():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            raise EvaluationError(f"{adapter_config}: base model {base!r} is not a local folder")
        return {"pretrained": base, "peft": str(model), "dtype": dtype}
    raise EvaluationError(f"{model}: neither a model folder nor a PEFT adapter folder")


def context_length(model: Path) -> int | None:
    """The context length in ``model``'s config.json as lm-eval's `hf` model reads it
    (``n_positions``, ``max_position_embeddings`` or ``n_ctx``, a nested ``text_config``
    first); None when it names none."""
    config = json.loads((model / "config.json").read_text())
    keys = ("n_positions", "max_position_embeddings", "n_ctx")
    for part in (config.get("text_config") or {}, config):
        found = [part[k] for k in keys if isinstance(part.get(k), int)]
        if found:
            return found[0]
    return None


def evaluate_tasks(
    model: str | Path, spec: EvaluateSpec, tasks: list[str]
) -> dict[str, TaskResult]:
    """Task -> primary score and per-example results of the local ``model`` on ``tasks``
    (names as :mod:`amalgam.evaluate.catalog` reads them; each group as its leaf tasks), run
    by lm-eval offline as ``spec`` says (dtype, device, batch size, limit, split)."""
    model = Path(model)
    target = str(pick_device(spec.device))
    args = model_args(model, torch_dtype(spec.dtype, spec.device))
    with quiet_custom_dataset_notice():
        tm, loaded = load_tasks(spec, tasks)
        check_generation(spec, loaded, str(model), context_length(Path(args["pretrained"])))
        import lm_eval  # lazy: lm-eval takes seconds to import; catalog set the offline switches

        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=args,
            tasks=list(loaded.values()),
            task_manager=tm,
            device=target,
            batch_size=spec.batch_size,
            limit=spec.limit,
            log_samples=True,
            bootstrap_iters=0,
        )
    if results is None:
        raise EvaluationError(f"{model}: lm-eval returned no results")
    out = {}
    for name, task in loaded.items():
        lm_name, primary = task.config.task, primary_metric(task)
        samples = sorted(
            (s for s in results["samples"][lm_name] if s["filter"] == primary.filter),
            key=lambda s: s["doc_id"],
        )
        out[name] = TaskResult(
            accuracy=float(results["results"][lm_name][primary.key]),
            correct=_pass_fail([s[primary.metric] for s in samples], primary.higher_is_better),
            metric=primary.metric,
            higher_is_better=primary.higher_is_better,
        )
    return out


def _pass_fail(values: list[Any], higher_is_better: bool) -> list[bool]:
    """Per-example pass/fail where the metric is one (each value 0 or 1), else []."""
    binary = higher_is_better and all(
        isinstance(v, bool | int | float) and v in (0, 1) for v in values
    )
    return [bool(v) for v in values] if binary else []


def _spec(tasks_dir: Path, **settings: Any) -> EvaluateSpec:
    from amalgam.recipe import EvaluateSpec  # lazy: the recipe imports the method registry

    return EvaluateSpec(tasks_dir=str(tasks_dir), **settings)


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
    results = _folder_tasks(model, tasks_dir, tasks, limit, batch_size, device, split)
    return {task: r.accuracy for task, r in results.items()}


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
    results = _folder_tasks(model, tasks_dir, tasks, limit, batch_size, device, split)
    return {task: r.correct for task, r in results.items()}


def _folder_tasks(
    model: str | Path,
    tasks_dir: Path,
    tasks: list[str] | None,
    limit: int | None,
    batch_size: int,
    device: str,
    split: str,
) -> dict[str, TaskResult]:
    """Results on task folders of ``tasks_dir``; a name that is none is an error."""
    tasks = list_tasks(Path(tasks_dir)) if tasks is None else list(tasks)
    if split not in ("test", "validation"):
        raise EvaluationError(f"unknown split {split!r}, use test or validation")
    spec = _spec(tasks_dir, tasks=tasks, limit=limit, batch_size=batch_size, device=device)
    spec = spec.model_copy(update={"split": split})
    missing = [
        str(Path(tasks_dir) / t / f"{t}.yaml") for t in tasks if not (Path(tasks_dir) / t).is_dir()
    ]
    if missing:
        raise EvaluationError(f"missing task files: {', '.join(missing)}")
    return evaluate_tasks(model, spec, tasks)
