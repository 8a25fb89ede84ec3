"""Which lm-eval tasks an evaluation names, and how each one is scored.

A name is, in this order: a task folder of ``tasks_dir`` (the project's layout, see
`taskdir`), a task or group of the user's YAML folders (``include_path``), or a task or group
of lm-eval's own registry (indexed only when a name is found nowhere else: that index takes
seconds). Groups and tags are scored as their leaf tasks, so every leaf keeps its
per-example results. Datasets must be on this machine: lm-eval runs offline.

The primary score of a task (:func:`primary_metric`) follows its output type: ``acc`` for
``multiple_choice`` and ``loglikelihood``, ``exact_match`` for ``generate_until``,
``word_perplexity`` (lower is better) for ``loglikelihood_rolling``; a task that does not
report that metric is scored by the first metric of its ``metric_list``. The score is read
under the task's first filter (its YAML's first ``filter_list`` entry, lm-eval's ``none`` when
it has none), e.g. ``exact_match,strict-match`` for a GSM8K-style task.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amalgam.evaluate.taskdir import EvaluationError, lm_eval_task_name

if TYPE_CHECKING:
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

    from amalgam.recipe import EvaluateSpec

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PREFERRED_METRIC = {
    "multiple_choice": "acc",
    "loglikelihood": "acc",
    "generate_until": "exact_match",
    "loglikelihood_rolling": "word_perplexity",
}
LOCAL_DATA_HINT = (
    "point it at a local copy: task_overrides {TASK: {dataset_path: json, dataset_kwargs: "
    "{data_files: {test: FILE.jsonl}}}} in the recipe's evaluate section, a task YAML of "
    "your own in include_path, or a Hugging Face datasets cache that holds it "
    "(HF_DATASETS_CACHE); see docs/lm-eval-tasks.md"
)


@dataclass(frozen=True)
class Primary:
    """The score a task is reported by: lm-eval's ``metric,filter`` result key."""

    metric: str
    filter: str
    higher_is_better: bool

    @property
    def key(self) -> str:
        return f"{self.metric},{self.filter}"


def offline() -> None:
    """lm-eval, datasets and the Hub run offline (set before lm-eval is imported)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def folder_task(spec: EvaluateSpec, name: str) -> bool:
    """Whether ``name`` is a task folder of ``spec.tasks_dir``."""
    return spec.tasks_dir is not None and (Path(spec.tasks_dir) / name / f"{name}.yaml").is_file()


def task_manager(spec: EvaluateSpec, names: list[str]) -> TaskManager:
    """lm-eval's task index over ``tasks_dir`` and ``include_path``, with lm-eval's own
    registry only when some name of ``names`` is in neither."""
    offline()
    paths = [*([spec.tasks_dir] if spec.tasks_dir else []), *spec.include_path]
    missing = [p for p in paths if not Path(p).is_dir()]
    if missing:
        raise EvaluationError(f"include_path: no folder at {', '.join(missing)}")
    local = _index(tuple(paths), False, _stamp(paths))
    if all(n in local.task_index for n in names):
        return local
    return _index(tuple(paths), True, _stamp(paths))


def _stamp(paths: list[str]) -> tuple[tuple[str, int, int], ...]:
    """Every file under ``paths`` with its mtime and size: an index is reused only while
    the folders it was built from are unchanged."""
    files = sorted(f for p in paths for f in Path(p).rglob("*") if f.is_file())
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)


@functools.lru_cache(maxsize=8)
def _index(paths: tuple[str, ...], defaults: bool, stamp: tuple[Any, ...]) -> TaskManager:
    """lm-eval's task index, built once per process for the same folders (lm-eval's own
    registry takes seconds to index; a stage run asks for it several times)."""
    from lm_eval.tasks import TaskManager  # lazy: lm-eval takes seconds to import

    return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


def lm_eval_names(spec: EvaluateSpec, names: list[str]) -> dict[str, str]:
    """Name as given -> lm-eval name (a folder task's split YAML; any other name as is)."""
    out = {}
    for name in names:
        if folder_task(spec, name):
            out[name] = lm_eval_task_name(name, spec.split)
        elif spec.split != "test":
            raise EvaluationError(
                f"task {name}: split {spec.split} applies to the task folders of tasks_dir; "
                "an lm-eval task scores the split its YAML names"
            )
        else:
            out[name] = name
    return out


def check_known(tm: TaskManager, names: list[str]) -> None:
    """Raise naming each unknown task and its closest known names."""
    for name in names:
        if name not in tm.task_index:
            close = difflib.get_close_matches(name, tm.all_tasks, n=3)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise EvaluationError(
                f"task {name}: not a task folder of tasks_dir, a task of include_path or an "
                f"lm-eval task or group{hint}"
            )


def leaf_names(spec: EvaluateSpec, names: list[str]) -> list[str]:
    """The tasks ``names`` stand for, as reported: each group or tag replaced by its leaf
    tasks (from the index: no dataset is read)."""
    from lm_eval.tasks._index import Kind  # lazy: as in task_manager

    plain = [n for n in names if not folder_task(spec, n)]
    tm = task_manager(spec, plain) if plain else None

    def expand(name: str) -> list[str]:
        entry = tm.task_index.get(name) if tm is not None else None
        if entry is None or entry.kind in (Kind.TASK, Kind.PY_TASK):
            return [name]
        if entry.kind == Kind.TAG:
            return [leaf for member in sorted(entry.tags) for leaf in expand(member)]
        cfg = entry.cfg or {}
        return [leaf for member in _members(cfg.get("task")) for leaf in expand(member)]

    if tm is not None:
        check_known(tm, plain)
    leaves = [leaf for n in names for leaf in expand(n)]
    repeated = sorted({leaf for leaf in leaves if leaves.count(leaf) > 1})
    if repeated:
        raise EvaluationError(f"tasks: {', '.join(repeated)} named twice (by groups or names)")
    return leaves


def _members(task_field: Any) -> list[str]:
    """The task or group names listed by a group's ``task:`` field."""
    items = task_field if isinstance(task_field, list) else [task_field]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and isinstance(item.get("task"), list):
            out += _members(item["task"])
        elif isinstance(item, dict):
            out.append(item.get("task") or item.get("group"))
    return out


def load_tasks(spec: EvaluateSpec, names: list[str]) -> tuple[TaskManager, dict[str, Task]]:
    """(the task index, reported task name -> lm-eval leaf task, datasets loaded) for
    ``names``; a dataset that is not on this machine is an error naming the task."""
    for name in spec.task_overrides:
        if name not in names:
            raise EvaluationError(f"task_overrides: {name} is not among the tasks {names}")
    lm_names = lm_eval_names(spec, names)
    plain = [n for n in names if not folder_task(spec, n)]
    tm = task_manager(spec, list(lm_names.values()))
    check_known(tm, plain)
    out: dict[str, Task] = {}
    for name, lm_name in lm_names.items():
        overrides = spec.task_overrides.get(name)
        request: str | dict[str, Any] = lm_name
        if overrides:  # lm-eval merges a group member's fields over its registered YAML
            request = {
                "group": f"amalgam-overrides-{name}",
                "task": [{**overrides, "task": lm_name}],
            }
        try:
            with no_progress_bars():
                leaves = tm.load([request])["tasks"]
        except OSError as exc:  # datasets raises ConnectionError/FileNotFoundError offline
            raise EvaluationError(
                f"task {name}: its dataset is not on this machine ({_first_line(exc)}); "
                + LOCAL_DATA_HINT.replace("TASK", name)
            ) from None
        if len(leaves) == 1 and name not in leaves:
            out[name] = next(iter(leaves.values()))  # a folder task's split YAML
        else:
            out |= leaves
    return tm, out


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """No `datasets` progress bars (preparing a local json file draws one on stderr)."""
    from datasets.utils import logging as datasets_logging  # lazy: lm-eval imported it

    enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets_logging.enable_progress_bar()


def check_generation(
    spec: EvaluateSpec, tasks: dict[str, Task], model: str, context: int | None
) -> None:
    """Cap generation at ``spec.max_gen_toks``; a task that would generate no token, or more
    than ``model``'s ``context`` length leaves room for, is an error naming both."""
    for name, task in tasks.items():
        if task.get_config("output_type") != "generate_until":
            continue
        if spec.max_gen_toks is not None:
            task.set_config("generation_kwargs", {"max_gen_toks": spec.max_gen_toks}, update=True)
        limit = (task.get_config("generation_kwargs") or {}).get("max_gen_toks")
        if limit is not None and int(limit) <= 0:
            raise EvaluationError(
                f"task {name}: generation_kwargs.max_gen_toks is {limit}, so no answer would be "
                "generated; give the task a positive limit (or evaluate.max_gen_toks)"
            )
        if limit is not None and context is not None and int(limit) >= context:
            raise EvaluationError(
                f"task {name}: max_gen_toks {limit} leaves no room for a prompt in the "
                f"{context}-token context of {model}; set evaluate.max_gen_toks below {context}"
            )


def primary_metric(task: Task) -> Primary:
    """The metric and filter ``task`` is reported by (see the module's docstring)."""
    better = task.higher_is_better()
    metrics = list(task.aggregation())
    if not metrics:
        raise EvaluationError(f"task {task.config.task}: it reports no metric")
    preferred = PREFERRED_METRIC.get(task.get_config("output_type"))
    metric = preferred if preferred in metrics else metrics[0]
    filters = task.get_config("filter_list") or []
    name = filters[0]["name"] if filters else "none"
    return Primary(metric, name, bool(better.get(metric, True)))


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
