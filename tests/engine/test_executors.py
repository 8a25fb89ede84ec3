"""Local and Ray executors give byte-identical outputs for every method, DARE included."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from amalgam.checkpoint import open_checkpoint
from amalgam.engine import MergeOptions, run_merge
from amalgam.methods import REGISTRY
from amalgam.recipe import parse_recipe
from tests.helpers import family, recipe_dict


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def method_recipe(method: str, base: Path, experts: list[Path], out: Path) -> dict:
    if method == "slerp":
        return recipe_dict(base, experts[:1], method, out)
    if method == "linear":
        return recipe_dict(None, experts, method, out)
    return recipe_dict(base, experts, method, out)


# Data-driven methods (statistics read alongside the inputs) have their own executor test in
# tests/statistics/test_merge_statistics.py: they need real, runnable models.
VARIANTS = [(m, {}) for m in sorted(REGISTRY) if not REGISTRY[m].reads_data] + [
    ("ties", {"trim": "model"}),  # whole-model statistics gathered before the Ray tasks
    ("breadcrumbs", {"granularity": "row"}),
    ("dare_linear", {"rescale": "l1"}),
    ("pcb", {"scope": "model"}),  # four whole-model statistics passes
]


# (max_shard_size, Ray unit_bytes): small shards of one part each, written whole by workers;
# two shards, each cut into parts that the driver puts together
LAYOUTS = [(600, 256 << 20), (700, 200)]


@pytest.mark.slow
def test_local_and_ray_outputs_are_byte_identical(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "in")
    for method, params in VARIANTS:
        for shard, unit in LAYOUTS:
            outputs = {}
            for executor in ("local", "ray"):
                out = tmp_path / f"{method}-{'-'.join(params.values())}-{shard}-{executor}"
                data = method_recipe(method, base, experts, out)
                recipe = parse_recipe(
                    {**data, "params": params, "max_shard_size": shard, "seed": 7}
                )
                options = MergeOptions(executor=executor, device="cpu", unit_bytes=unit)
                run_merge(recipe, options)
                outputs[executor] = digest(out)
            assert len(outputs["local"]) > 2, method
            assert outputs["local"] == outputs["ray"], (method, params, shard)


@pytest.mark.slow
def test_a_tensor_kept_from_one_expert_is_the_same_on_ray(tmp_path: Path) -> None:
    """extra_tensors: keep_from_first reads the kept tensor from its own input on each worker."""
    base, experts = family(tmp_path / "in", n=2)
    head = torch.randn(16, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    weights = experts[1] / "model.safetensors"
    save_file({**load_file(weights), "lm_head.weight": head}, weights)
    outputs = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        data = recipe_dict(base, experts, "ties", out)
        recipe = parse_recipe({**data, "extra_tensors": "keep_from_first", "max_shard_size": 600})
        run_merge(recipe, MergeOptions(executor=executor, device="cpu"))
        outputs[executor] = digest(out)
        with open_checkpoint(str(out)) as merged:
            assert torch.equal(merged.tensor("lm_head.weight"), head)
    assert len(outputs["local"]) > 2 and outputs["local"] == outputs["ray"]


def test_same_recipe_same_bytes_and_seed_changes_dare(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "in")
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / name
        run_merge(parse_recipe(recipe_dict(base, experts, "dare_ties", out, seed=seed)))
        runs[name] = digest(out)
    assert runs["a"] == runs["b"]
    assert runs["a"]["model.safetensors"] != runs["c"]["model.safetensors"]


def test_output_loads_in_transformers_with_provenance(tmp_path: Path) -> None:
    """A real (tiny) Llama merged with TIES loads with AutoModelForCausalLM and says where
    it came from in its safetensors metadata."""
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    paths = [tmp_path / "m0"]
    base.save_pretrained(paths[0])
    for i in (1, 2):
        expert = LlamaForCausalLM(cfg)
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.01 * torch.randn_like(p))
        paths.append(tmp_path / f"m{i}")
        expert.save_pretrained(paths[-1])
    out = tmp_path / "merged"
    recipe = parse_recipe(recipe_dict(paths[0], paths[1:], "ties", out, dtype="bfloat16"))
    run_merge(recipe)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_hidden_layers == 2
    assert next(loaded.parameters()).dtype == torch.bfloat16
    meta = open_checkpoint(str(out)).metadata["model.safetensors"]
    assert meta["recipe_hash"] == recipe.hash()
    parents = dict(item.split("=", 1) for item in meta["parents"].split(";"))
    assert parents == {
        label: open_checkpoint(str(p)).content_hash()
        for label, p in zip(["base", "m1", "m2"], paths, strict=True)
    }
