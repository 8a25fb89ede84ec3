"""Layout of an embedding task folder (for encoder models), next to lm-eval task folders.

`tasks_dir/<task>/embedding.json` names the task's type; the records are jsonl files:

- ``classification``: `train.jsonl` (the labelled texts the centroids come from) and
  `<split>.jsonl` (`test`, `validation`), each record ``{"text": str, "label": str}``;
- ``retrieval``: `corpus.jsonl` (``{"id": str, "text": str}``) and `<split>.jsonl`, one query
  per record: ``{"query": str, "relevant": {doc_id: grade}}`` (or a list of ids, grade 1);
- ``sts``: `<split>.jsonl`, ``{"text1": str, "text2": str, "score": float}``.

The descriptor is JSON, not YAML, so that lm-eval's task index (every `*.yaml` under an include
path) never reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from amalgam.evaluate.taskdir import EvaluationError

DESCRIPTOR = "embedding.json"
KINDS = ("classification", "retrieval", "sts")
#: The fields each kind's `<split>.jsonl` records need.
FIELDS = {
    "classification": ("text", "label"),
    "retrieval": ("query", "relevant"),
    "sts": ("text1", "text2", "score"),
}


class EmbeddingTask(BaseModel):
    """`embedding.json`: the task's type and, for retrieval, the cut-offs of its figures."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["classification", "retrieval", "sts"]
    k: int = 10  # nDCG@k, the primary retrieval score
    recall_at: list[int] = [1, 10]


def is_embedding_task(tasks_dir: Path, task: str) -> bool:
    return (Path(tasks_dir) / task / DESCRIPTOR).is_file()


def list_embedding_tasks(tasks_dir: Path) -> list[str]:
    """Names of the embedding task folders under ``tasks_dir``, sorted."""
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        return []
    return sorted(p.name for p in tasks_dir.iterdir() if (p / DESCRIPTOR).is_file())


def read_task(tasks_dir: Path, task: str) -> EmbeddingTask:
    path = Path(tasks_dir) / task / DESCRIPTOR
    if not path.is_file():
        raise EvaluationError(f"task {task}: no {DESCRIPTOR} at {path}")
    try:
        return EmbeddingTask.model_validate_json(path.read_text())
    except ValidationError as exc:
        bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise EvaluationError(f"{path}: {bad}") from None


def read_records(
    tasks_dir: Path, task: str, name: str, fields: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The records of `tasks_dir/<task>/<name>.jsonl`; each must have ``fields``."""
    path = Path(tasks_dir) / task / f"{name}.jsonl"
    if not path.is_file():
        raise EvaluationError(f"task {task}: no {name} records at {path}")
    records = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvaluationError(f"{path}:{n}: not JSON ({exc.msg})") from None
            missing = [k for k in fields if not isinstance(record, dict) or k not in record]
            if missing:
                raise EvaluationError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
            records.append(record)
    if not records:
        raise EvaluationError(f"{path}: no records")
    return records


def relevance(record: dict[str, Any], where: str) -> dict[str, float]:
    """A retrieval record's ``relevant`` as doc id -> grade."""
    rel = record["relevant"]
    if isinstance(rel, list):
        rel = {str(d): 1.0 for d in rel}
    if not isinstance(rel, dict) or not rel:
        raise EvaluationError(f"{where}: 'relevant' must be a non-empty list or mapping of ids")
    return {str(d): float(g) for d, g in rel.items()}
