"""Layout of a folder of local lm-eval tasks: one sub-folder per task, one YAML per split.

`tasks_dir/<task>/` holds `<task>.yaml` (scores the test split), `<task>_val.yaml` (scores the
validation split, for hyper-parameter search) and the `<split>.jsonl` records (prompt, choices,
label) that both read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from amalgam.errors import AmalgamError

SPLIT_SUFFIXES = {"test": "", "validation": "_val"}


class EvaluationError(AmalgamError):
    """A task or model cannot be evaluated (missing task folder, split, model folder)."""


def lm_eval_task_name(task: str, split: str) -> str:
    """The lm-eval task that scores `task` on `split` ('test' or 'validation')."""
    if split not in SPLIT_SUFFIXES:
        raise EvaluationError(f"task {task}: unknown split {split!r}, use one of {SPLIT_SUFFIXES}")
    return task + SPLIT_SUFFIXES[split]


def list_tasks(tasks_dir: Path) -> list[str]:
    """Names of the task folders under `tasks_dir`, sorted."""
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise EvaluationError(f"no tasks folder at {tasks_dir}")
    return sorted(p.name for p in tasks_dir.iterdir() if (p / f"{p.name}.yaml").is_file())


def read_split(tasks_dir: Path, task: str, split: str) -> list[dict[str, Any]]:
    """The records of `tasks_dir/<task>/<split>.jsonl`: prompt, choices, label."""
    path = Path(tasks_dir) / task / f"{split}.jsonl"
    if not path.is_file():
        raise EvaluationError(f"task {task}: no {split} split at {path}")
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]
