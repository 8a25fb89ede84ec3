"""The pipeline takes adapters listed with the recipe's base: a re-run finds the merge done
(the provenance's parent hash is the one the fetch stage computes), and a change to an
adapter's config (its scale) makes the merge run again."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from amalgam.engine import MergeOptions
from amalgam.errors import CheckpointError
from amalgam.pipeline import run_pipeline
from amalgam.recipe import parse_recipe
from tests.adapters.builders import adapter, base_model, edit_config
from tests.helpers import recipe_dict


@pytest.mark.parametrize("method", ["ties", "opcm"])
def test_rerun_skips_and_config_change_reruns(method: str, tmp_path: Path) -> None:
    base = base_model(tmp_path / "base")
    loras = [adapter(base, tmp_path / f"lora{i}", seed=i + 1) for i in range(2)]
    recipe = parse_recipe(recipe_dict(base, loras, method, tmp_path / "out", align={}))
    first = run_pipeline(recipe)
    before = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not first.skipped_merge
    assert run_pipeline(recipe).skipped_merge
    edit_config(loras[1], lora_alpha=2)
    third = run_pipeline(recipe, MergeOptions(overwrite=True))
    assert not third.skipped_merge and third.content_hash != first.content_hash
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not after[name].equal(before[name])


def test_base_plus_adapter_references_run_through_the_pipeline(tmp_path: Path) -> None:
    """mergekit's ``BASE+ADAPTER`` with no recipe base: fetch hashes the model each reference
    makes, the merge equals one over the same adapters listed with a base, a re-run skips,
    and ``--stage`` refuses such a reference in one line instead of copying half of it."""
    base = base_model(tmp_path / "base")
    loras = [adapter(base, tmp_path / f"lora{i}", seed=i + 1) for i in range(2)]
    refs = [f"{base}+{lora}" for lora in loras]
    data = recipe_dict(None, refs, "linear", tmp_path / "refs")
    first = run_pipeline(parse_recipe(data))
    assert [m["uri"] for m in first.inputs] == refs
    listed = run_pipeline(parse_recipe(recipe_dict(base, loras, "linear", tmp_path / "listed")))
    refs_out = load_file(str(tmp_path / "refs" / "model.safetensors"))
    listed_out = load_file(str(tmp_path / "listed" / "model.safetensors"))
    assert refs_out.keys() == listed_out.keys()
    assert all(refs_out[k].equal(listed_out[k]) for k in refs_out)
    assert not listed.skipped_merge and run_pipeline(parse_recipe(data)).skipped_merge
    with pytest.raises(CheckpointError, match=r"--stage copies model folders, not BASE\+ADAPTER"):
        run_pipeline(parse_recipe(recipe_dict(None, refs, "linear", tmp_path / "s")), stage=True)
    assert not (tmp_path / "s").exists()
