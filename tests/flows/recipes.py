"""Recipe and config builders for the flow tests (tiny zoo, quick evaluation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TASKS = ["zoo_mulmod", "zoo_compare"]  # the tiny zoo tasks whose experts beat the base most


def evaluate_section(zoo, **extra: Any) -> dict:
    return {
        "tasks_dir": str(zoo.tasks_dir),
        "tasks": TASKS,
        "limit": 24,
        "engine": "quick",
        "device": "cpu",
        **extra,
    }


def register_section(tracking_uri: str, name: str = "zoo", **gates: Any) -> dict:
    return {"tracking_uri": tracking_uri, "model_name": name, "gates": gates}


def nightly_config(zoo, experts: str, tracking_uri: str, workdir: Path, **gates: Any) -> dict:
    return {
        "experts": experts,
        "workdir": str(workdir),
        "recipe": {
            "method": "continual_ta",
            "base": str(zoo.base),
            "params": {"lambda": 0.5},
            "dtype": "float32",
            "evaluate": evaluate_section(zoo),
            "register": register_section(tracking_uri, **gates),
        },
    }
