"""Search and soup tests: the tiny zoo, a recipe over two of its experts, a spec file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from zoo.conftest import zoo_tiny

__all__ = ["zoo_tiny"]

EXPERTS = ["zoo_mulmod", "zoo_compare"]


def recipe_data(zoo, **extra: Any) -> dict:
    return {
        "method": "task_arithmetic",
        "base": str(zoo.base),
        "models": [{"uri": str(zoo.experts[e])} for e in EXPERTS],
        "params": {"lambda": 0.3},
        "evaluate": {"tasks_dir": str(zoo.tasks_dir), "tasks": EXPERTS, "engine": "quick"},
        **extra,
    }


@pytest.fixture
def write_spec(zoo_tiny, tmp_path: Path):
    """``write_spec(recipe_extra={}, **spec_fields)`` -> the spec file (recipe beside it)."""

    def write(recipe_extra: dict | None = None, **fields: Any) -> Path:
        (tmp_path / "recipe.yaml").write_text(
            yaml.safe_dump(recipe_data(zoo_tiny, **(recipe_extra or {})))
        )
        spec = {
            "recipe": "recipe.yaml",
            "space": {"weight": {"low": 0.0, "high": 1.5}},
            "objective": {"tasks": dict.fromkeys(EXPERTS, 1.0), "limit": 16},
            "generations": 4,
            "population": 4,
            "executor": "local",
            "state": str(tmp_path / "state"),
            **fields,
        }
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return write
