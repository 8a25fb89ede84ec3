"""A sweep point's recipe: the method and parameters of the point, the recipe's overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from amalgam.pipeline_config import GridPoint
from amalgam.recipe import parse_recipe
from amalgam.sweep import point_recipe


@pytest.fixture
def recipe(tmp_path: Path):
    return parse_recipe(
        {
            "method": "tsv_m",
            "base": str(tmp_path / "base"),
            "models": [{"uri": str(tmp_path / "a")}, {"uri": str(tmp_path / "b")}],
            "params": {"lambda": 1.6, "svd": "full"},
            "overrides": [
                {"match": "embed_tokens|lm_head", "params": {"svd": "none"}},
                {"match": "mlp", "params": {"lambda": 1.2}, "models": {"a": {"weight": 2.0}}},
            ],
        }
    )


def test_a_point_of_the_recipes_method_keeps_its_overrides(recipe, tmp_path: Path) -> None:
    point = point_recipe(recipe, GridPoint(method="tsv_m", params={"lambda": 1.0}))
    assert point.params == {"lambda": 1.0, "svd": "full"}
    assert point.overrides == recipe.overrides
    assert point.hash() != recipe.hash()


def test_another_methods_point_keeps_the_override_parameters_it_knows(recipe) -> None:
    point = point_recipe(recipe, GridPoint(method="task_arithmetic", params={"lambda": 0.3}))
    assert point.params == {"lambda": 0.3}
    # `svd` means nothing to task arithmetic: that override goes; `lambda` stays, and the
    # per-model `weight` too, since task arithmetic takes per-model weights
    [kept] = point.overrides
    assert kept.match == "mlp" and kept.params == {"lambda": 1.2}
    assert kept.models == {"a": {"weight": 2.0}}
