"""The plan knows which inputs are adapters: it names them, gives each every base tensor, and
records a URI (BASE+ADAPTER) that reopens the same dense view (what a Ray worker does)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from amalgam.adapters import AdapterCheckpoint, open_input
from amalgam.engine import plan_recipe
from amalgam.recipe import parse_recipe
from tests.adapters.builders import adapter, base_model
from tests.helpers import recipe_dict


def test_plan_names_adapters_and_reopens_them(tmp_path: Path) -> None:
    base = base_model(tmp_path / "base")
    lora = adapter(base, tmp_path / "lora", seed=1, target_modules=["q_proj", "v_proj"])
    expert = tmp_path / "expert"
    expert.mkdir()
    (expert / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
    data = recipe_dict(base, [lora, expert], "task_arithmetic", tmp_path / "out")
    plan = plan_recipe(parse_recipe(data))
    assert plan.adapters == {"lora": str(lora)}
    assert "'lora': LoRA adapter" in plan.describe()
    names = sorted(load_file(str(base / "model.safetensors")))
    assert sorted(j.name for j in plan.jobs) == names  # the adapter has every base tensor
    assert all(not j.copy for j in plan.jobs)
    uri = plan.uris[plan.labels.index("lora")]
    assert uri == f"{base}+{lora}"
    with open_input(uri) as ckpt, open_input(str(lora), base=str(base)) as again:
        assert isinstance(ckpt, AdapterCheckpoint)
        assert sorted(ckpt.layout.patches) == sorted(
            f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")
        )
        for name in names:
            assert torch.equal(ckpt.tensor(name), again.tensor(name))
        # over the recipe's base (a parent of its own) the adapter's hash is its folder's, as
        # the fetch stage computes it; BASE+ADAPTER covers both
        assert again.content_hash() == again.adapter.content_hash()
        assert ckpt.content_hash() not in (again.content_hash(), ckpt.base.content_hash())
