"""Merge recipes of the MiniLM zoo's two fine-tunes, with an evaluate section that scores
each task against its own fine-tune (the docs' table and the tests use them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from amalgam.zoo.minilm.build import TASKS, EmbeddingZoo

#: Method -> parameters: the authors' defaults (TA's lambda for a sum of two task vectors).
MERGES: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 0.2, "lambda": 1.0},
    "tsv_m": {"lambda": 1.0},
}


def merge_recipe(zoo: EmbeddingZoo, method: str, output: str | Path) -> dict[str, Any]:
    """A recipe (as a dict) merging both fine-tunes into ``output`` with ``method``."""
    return {
        "method": method,
        "base": str(zoo.base),
        "models": [{"uri": str(zoo.experts[t]), "name": t} for t in TASKS],
        "params": MERGES[method],
        "dtype": "float32",
        "output": str(output),
        "evaluate": {
            "tasks_dir": str(zoo.tasks_dir),
            "device": "cpu",
            "experts": {t: t for t in TASKS},
        },
    }
