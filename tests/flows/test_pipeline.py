"""merge_pipeline as a real Prefect flow: stages in order, a re-run skips the merge."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from amalgam.recipe import parse_recipe
from flows.pipeline import merge_pipeline


def ta_recipe(zoo, output: Path, **sections) -> dict:
    experts = sorted(zoo.experts)[:2]
    return {
        "method": "task_arithmetic",
        "base": str(zoo.base),
        "models": [{"uri": str(zoo.experts[e])} for e in experts],
        "params": {"lambda": 0.5},
        "dtype": "float32",
        "output": str(output),
        **sections,
    }


def test_pipeline_merges_then_skips_a_finished_merge(zoo_tiny, tmp_path: Path) -> None:
    recipe = parse_recipe(ta_recipe(zoo_tiny, tmp_path / "merged"))
    first = merge_pipeline(recipe)
    assert not first.skipped_merge
    assert [m["label"] for m in first.inputs] == ["base", *sorted(zoo_tiny.experts)[:2]]
    # independent check: base + 0.5 * sum of task vectors
    base = load_file(zoo_tiny.base / "model.safetensors")
    experts = [
        load_file(zoo_tiny.experts[e] / "model.safetensors") for e in sorted(zoo_tiny.experts)[:2]
    ]
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    name = next(n for n in base if n.endswith("q_proj.weight"))
    expected = base[name].float() + 0.5 * sum(e[name].float() - base[name].float() for e in experts)
    torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    stamp = (tmp_path / "merged" / "model.safetensors").stat().st_mtime_ns

    second = merge_pipeline(recipe)
    assert second.skipped_merge
    assert second.content_hash == first.content_hash
    assert (tmp_path / "merged" / "model.safetensors").stat().st_mtime_ns == stamp
