"""Adapter outputs (``output_format: adapter``): concat equals the dense merge exactly, through
PEFT's own loading; LoRA-LEGO gives an adapter of the chosen rank; svd re-ranks any method's
merge; what cannot be an adapter is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from amalgam.adapters.adapter_output import merge_recipe
from amalgam.engine import MergeOptions, run_merge
from amalgam.errors import AmalgamError, PlanError, RecipeError
from amalgam.evaluate.score import score_model
from amalgam.pipeline import run_pipeline
from amalgam.recipe import EvaluateSpec, parse_recipe
from tests.adapters.builders import adapter, base_model
from tests.helpers import recipe_dict

KINDS = [
    {},
    {"use_rslora": True, "rank_pattern": {"up_proj": 2}, "alpha_pattern": {"q_proj": 5}},
    {"r": 3, "target_modules": ["q_proj", "v_proj", "down_proj"]},
]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("adapter-out")
    base = base_model(root / "base")
    return base, [adapter(base, root / f"lora{i}", seed=i + 1, **c) for i, c in enumerate(KINDS)]


def dense(base: Path, loras: list[Path], method: str, out: Path, **extra) -> dict:
    run_merge(parse_recipe(recipe_dict(base, loras, method, out, **extra)))
    return load_file(str(out / "model.safetensors"))


def peft_model(base: Path, folder: Path):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, folder)


def test_concat_is_the_dense_merge_through_peft(family, tmp_path: Path) -> None:
    base, loras = family
    params = {"params": {"lambda": 0.7}}
    want = dense(base, loras, "task_arithmetic", tmp_path / "dense", **params)
    data = recipe_dict(base, loras, "task_arithmetic", tmp_path / "a", output_format="adapter")
    merge_recipe(parse_recipe({**data, **params}))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "amalgam-commit.json"]
    lora = peft_model(base, tmp_path / "a")
    # rank = sum of the ranks each module has in the inputs (4 + 4 + 3 for q_proj)
    assert lora.peft_config["default"].r in (8, 11)
    ids = torch.arange(12).view(2, 6) % 40
    with torch.no_grad():
        logits = lora(ids).logits
        merged = lora.merge_and_unload()
        full = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
        torch.testing.assert_close(logits, full(ids).logits, atol=1e-5, rtol=1e-5)
    state = merged.state_dict()
    for name, tensor in want.items():
        torch.testing.assert_close(state[name], tensor, atol=1e-5, rtol=1e-5)


def test_concat_folds_linear_weights(family, tmp_path: Path) -> None:
    base, loras = family
    weights = (1, 2, 5)
    models = [{"uri": str(p), "params": {"weight": w}} for p, w in zip(loras, weights, strict=True)]
    data = {"method": "linear", "base": str(base), "models": models}
    run_merge(parse_recipe({**data, "output": str(tmp_path / "dense")}))
    merge_recipe(parse_recipe({**data, "output": str(tmp_path / "a"), "output_format": "adapter"}))
    merged = peft_model(base, tmp_path / "a").merge_and_unload().state_dict()
    for name, tensor in load_file(str(tmp_path / "dense" / "model.safetensors")).items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-5, rtol=1e-5)


def test_lora_lego_gives_the_chosen_rank_and_keeps_the_update_norm(family, tmp_path) -> None:
    base, loras = family
    data = recipe_dict(base, loras, "task_arithmetic", tmp_path / "lego")
    spec = {"output_format": "adapter", "adapter_output": {"method": "lora_lego", "rank": 4}}
    merge_recipe(parse_recipe({**data, **spec}))
    dense_out = dense(base, loras, "task_arithmetic", tmp_path / "dense")
    lora = peft_model(base, tmp_path / "lego")
    assert lora.peft_config["default"].r == 4
    tensors = load_file(str(tmp_path / "lego" / "adapter_model.safetensors"))
    assert max(t.shape[0] for k, t in tensors.items() if "lora_A" in k) <= 4
    merged = lora.merge_and_unload().state_dict()
    base_w = load_file(str(base / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    got, want = merged[name] - base_w[name], dense_out[name] - base_w[name]
    torch.testing.assert_close(torch.linalg.matrix_norm(got), torch.linalg.matrix_norm(want))
    assert not torch.allclose(got, want, atol=1e-3)  # rank 4 < 11: an approximation


def test_svd_reranks_any_method_and_leaves_no_scratch(family, tmp_path: Path) -> None:
    base, loras = family
    want = dense(base, loras, "ties", tmp_path / "dense")
    data = recipe_dict(base, loras, "ties", tmp_path / "out" / "svd")
    spec = {"output_format": "adapter", "adapter_output": {"method": "svd", "rank": 16}}
    result = merge_recipe(parse_recipe({**data, **spec}))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["svd"]
    merged = peft_model(base, tmp_path / "out" / "svd").merge_and_unload().state_dict()
    for name, tensor in want.items():  # rank 16 is full rank for these 16-24 wide matrices
        torch.testing.assert_close(merged[name], tensor, atol=1e-4, rtol=1e-4)
    assert result.plan.metadata["method"] == "ties"


def test_pipeline_skips_a_finished_adapter_output(family, tmp_path: Path) -> None:
    base, loras = family
    data = recipe_dict(base, loras, "task_arithmetic", tmp_path / "a", output_format="adapter")
    assert not run_pipeline(parse_recipe(data)).skipped_merge
    assert run_pipeline(parse_recipe(data)).skipped_merge


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"method": "ties"}, RecipeError, "use svd for 'ties'"),
        ({"adapter_output": {"method": "concat", "rank": 4}}, RecipeError, "keeps every rank"),
        ({"adapter_output": {"method": "svd"}, "output_format": "dense"}, RecipeError, "set "),
        ({"full": True}, PlanError, "is a full model"),
        ({"dora": True}, PlanError, "is a DoRA adapter"),
    ],
)
def test_what_cannot_be_an_adapter_is_refused(family, tmp_path, change, error, message) -> None:
    base, loras = family
    inputs = list(loras)
    if change.pop("full", False):
        inputs[0] = base_model(tmp_path / "full", seed=3)
    if change.pop("dora", False):
        inputs[0] = adapter(base, tmp_path / "dora", seed=9, use_dora=True)
    data = {
        **recipe_dict(base, inputs, "task_arithmetic", tmp_path / "out"),
        "output_format": "adapter",
        **change,
    }
    with pytest.raises(error, match=message) as err:
        merge_recipe(parse_recipe(data))
    assert isinstance(err.value, AmalgamError)
    assert not (tmp_path / "out").exists()


def test_the_engine_refuses_to_write_an_adapter_output_densely(family, tmp_path) -> None:
    base, loras = family
    data = recipe_dict(base, loras, "linear", tmp_path / "out", output_format="adapter")
    with pytest.raises(RecipeError, match="merge_recipe"):
        run_merge(parse_recipe(data), MergeOptions())


def test_an_adapter_output_scores_as_its_dense_merge(zoo_tiny, tmp_path: Path) -> None:
    """The zoo's adapters merged by concat: both evaluation engines score the adapter folder
    (loaded over its base, with the base's tokenizer) as they score the dense merge."""
    loras = [zoo_tiny.loras[t] for t in ("zoo_sort", "zoo_count")]
    data = recipe_dict(zoo_tiny.base, loras, "task_arithmetic", tmp_path / "adapter")
    merge_recipe(parse_recipe({**data, "output_format": "adapter"}))
    run_merge(parse_recipe(recipe_dict(zoo_tiny.base, loras, "task_arithmetic", tmp_path / "d")))
    for engine in ("quick", "lm_eval"):
        spec = EvaluateSpec(
            tasks_dir=str(zoo_tiny.tasks_dir), engine=engine, device="cpu", limit=20
        )
        tasks = ["zoo_sort", "zoo_count"]
        adapter_score = score_model(str(tmp_path / "adapter"), spec, tasks)
        dense_score = score_model(str(tmp_path / "d"), spec, tasks)
        assert adapter_score.tasks == dense_score.tasks, engine
