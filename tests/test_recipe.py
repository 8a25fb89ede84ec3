"""Recipe validation: labels, unknown fields, YAML loading with environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from amalgam.errors import RecipeError
from amalgam.recipe import load_recipe, parse_recipe


def test_a_model_named_base_is_refused_when_there_is_a_base() -> None:
    with pytest.raises(RecipeError, match="named 'base'"):
        parse_recipe({"method": "ties", "base": "/m/base0", "models": [{"uri": "/x/base"}]})
    # without a base the label is free
    recipe = parse_recipe({"method": "linear", "models": [{"uri": "/x/base"}]})
    assert recipe.models[0].label == "base"


def test_duplicate_labels_and_unknown_override_model() -> None:
    with pytest.raises(RecipeError) as err:
        parse_recipe(
            {
                "method": "ties",
                "base": "/b",
                "models": [{"uri": "/a/m"}, {"uri": "/c/m"}],
                "overrides": [{"match": "mlp", "models": {"zz": {"density": 0.5}}}],
            }
        )
    assert "two models are named 'm'" in str(err.value)
    assert "overrides[0].models.zz" in str(err.value)


def test_bad_regex_and_unknown_field_name_their_path() -> None:
    with pytest.raises(RecipeError, match=r"overrides\.0\.match"):
        parse_recipe({"method": "linear", "models": [{"uri": "/a"}], "overrides": [{"match": "("}]})
    with pytest.raises(RecipeError, match=r"models\.0\.wieght"):
        parse_recipe({"method": "linear", "models": [{"uri": "/a", "wieght": 1}]})


def test_load_recipe_expands_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ZOO", "/somewhere")
    path = tmp_path / "r.yaml"
    path.write_text("method: linear\nmodels:\n  - uri: ${ZOO}/a\n")
    assert load_recipe(path).models[0].uri == "/somewhere/a"
    path.write_text("method: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_recipe_hash_ignores_output_only() -> None:
    a = parse_recipe({"method": "linear", "models": [{"uri": "/a"}], "output": "/o1"})
    b = parse_recipe({"method": "linear", "models": [{"uri": "/a"}], "output": "/o2"})
    c = parse_recipe({"method": "linear", "models": [{"uri": "/a"}], "seed": 1})
    assert a.hash() == b.hash() != c.hash()


def test_recipe_executor_is_checked_and_not_hashed() -> None:
    local = parse_recipe({"method": "linear", "models": [{"uri": "/a"}]})
    ray = parse_recipe({"method": "linear", "models": [{"uri": "/a"}], "executor": "ray"})
    assert ray.executor == "ray" and local.executor is None
    assert local.hash() == ray.hash()  # both executors write the same bytes
    with pytest.raises(RecipeError, match="executor"):
        parse_recipe({"method": "linear", "models": [{"uri": "/a"}], "executor": "dask"})
