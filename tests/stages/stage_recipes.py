"""Recipe builders for the stage tests (tiny zoo, task arithmetic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def ta_recipe(zoo: Any, output: Path, experts: list[str], **changes: Any) -> dict[str, Any]:
    """A task arithmetic merge of ``experts`` into ``output`` (lambda 0.5, float32)."""
    return {
        "method": "task_arithmetic",
        "base": str(zoo.base),
        "models": [{"uri": str(zoo.experts[e])} for e in experts],
        "params": {"lambda": 0.5},
        "dtype": "float32",
        "output": str(output),
        **changes,
    }
