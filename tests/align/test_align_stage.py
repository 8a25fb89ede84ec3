"""The align stage's contract: a recipe whose align method rewrites the inputs merges only what
the stage hands on."""

from __future__ import annotations

from pathlib import Path

import pytest

from amalgam.engine import MergeOptions, run_merge
from amalgam.errors import RecipeError
from amalgam.recipe import Recipe
from tests.helpers import llama_tensors, write_model


@pytest.mark.parametrize(
    "method", ["vocab", "transplant", "weight_matching", "activation_matching", "pleas"]
)
def test_the_engine_alone_refuses_a_recipe_whose_inputs_need_aligning(
    tmp_path: Path, method: str
) -> None:
    a = write_model(tmp_path / "a", llama_tensors(0))
    b = write_model(tmp_path / "b", llama_tensors(1))
    recipe = Recipe.model_validate(
        {
            "models": [{"uri": str(a)}, {"uri": str(b)}],
            "method": "linear",
            "align": {"method": method},
            "output": str(tmp_path / "out"),
        }
    )
    with pytest.raises(RecipeError, match=f"align.method: {method} rewrites the inputs"):
        run_merge(recipe, MergeOptions())
    assert not (tmp_path / "out").exists()
    # the align stage's options let it through (here: nothing to rewrite, so the inputs merge)
    run_merge(recipe, MergeOptions(aligned=True))
    assert (tmp_path / "out" / "model.safetensors").is_file()
