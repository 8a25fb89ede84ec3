"""The planner turns each method's needs into passes; the plan prints them, reading no tensor."""

from __future__ import annotations

from pathlib import Path

import pytest

from amalgam.engine import plan_recipe
from amalgam.engine.plan import (
    AbsorbStep,
    DataStatisticsPass,
    NormPass,
    TensorPass,
    WholeModelPass,
    plan_passes,
)
from amalgam.methods import REGISTRY
from amalgam.recipe import parse_recipe
from tests.helpers import family, recipe_dict


def passes(method: str, **params) -> tuple:
    data = {"method": method, "base": "b", "models": [{"uri": "m0"}, {"uri": "m1"}]}
    if REGISTRY[method].reads_data:
        data["models"] = [{"uri": m["uri"], "data": "d.jsonl"} for m in data["models"]]
    recipe = parse_recipe({**data, "params": params})
    return plan_passes(recipe, recipe.method_spec)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "pcb", "slerp", "tsv_m"])
def test_a_per_tensor_recipe_is_one_tensor_pass(method: str) -> None:
    if method == "slerp":
        recipe = parse_recipe({"method": method, "base": "b", "models": [{"uri": "m0"}]})
        assert plan_passes(recipe, recipe.method_spec) == (TensorPass(),)
    else:
        assert passes(method) == (TensorPass(),)


@pytest.mark.parametrize(
    ("method", "params", "keys", "count"),
    [
        ("ties", {"trim": "model"}, ("magnitude_threshold",), 2),
        ("consensus_ties", {"trim": "model"}, ("magnitude_threshold",), 2),
        ("pcb", {"scope": "model"}, ("pcb_model",), 4),
    ],
)
def test_a_whole_model_statistic_is_a_pass_before_the_tensors(method, params, keys, count):
    first, last = passes(method, **params)
    assert isinstance(first, WholeModelPass)
    assert (first.keys, first.passes) == (keys, count)
    assert last == TensorPass()


@pytest.mark.parametrize(
    ("method", "kind", "settings"),
    [
        ("fisher", "fisher", '{"fisher": "exact", "samples": 8}'),
        ("regmean", "gram", '{"samples": 8, "version": 2}'),
    ],
)
def test_data_statistics_are_a_pass_before_the_tensors(method, kind, settings) -> None:
    assert passes(method, samples=8) == (DataStatisticsPass(kind, settings), TensorPass())


def test_a_running_state_is_one_step_per_model_each_with_its_passes() -> None:
    steps = passes("opcm")
    assert [type(s) for s in steps] == [AbsorbStep, AbsorbStep]
    assert [s.model for s in steps] == ["m0", "m1"]
    assert [type(p) for p in steps[0].passes] == [NormPass, TensorPass]
    assert [type(p) for p in passes("continual_ta")[1].passes] == [TensorPass]


def test_the_printed_plan_keeps_its_lines_and_adds_the_passes(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "in")
    data = recipe_dict(base, experts, "ties", tmp_path / "out", params={"trim": "model"})
    text = plan_recipe(parse_recipe(data)).describe()
    assert text.splitlines()[0] == "method ties; inputs: base, expert0, expert1, expert2"
    assert "  model.safetensors: 9 tensors" in text
    assert text.endswith(
        "passes:\n"
        "  1. whole-model statistics: magnitude_threshold (2 streaming passes)\n"
        "  2. tensors: merge each tensor into its shard"
    )


def test_a_continual_plan_prints_its_steps(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "in", n=2)
    text = plan_recipe(parse_recipe(recipe_dict(base, experts, "opcm", tmp_path / "o"))).describe()
    first = "1. absorb 'expert0': norms of the unscaled merge and the new task vector; then tensors"
    assert first in text
    assert "2. absorb 'expert1': norms of" in text
