"""Base + adapter read through amalgam equals PEFT's own merge_and_unload, tensor by tensor, for
each PEFT convention: scaling (alpha/r, rsLoRA), rank/alpha patterns, fan_in_fan_out,
modules_to_save, an embedding LoRA (with its saved base layer) and DoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amalgam.adapters import AdapterCheckpoint, open_input
from tests.adapters.builders import adapter, base_model, peft_merged

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
VARIANTS = {
    "alpha/r": {},
    "rslora": {"use_rslora": True},
    "patterns": {
        "rank_pattern": {"layers.1.self_attn.q_proj": 2, "down_proj": 6},
        "alpha_pattern": {"o_proj": 3, r"layers\.0\.mlp\.up_proj": 20},
    },
    "fan_in_fan_out": {"gpt2": True, "target_modules": GPT2_TARGETS, "fan_in_fan_out": True},
    "modules_to_save": {"modules_to_save": ["lm_head"], "perturb": True},
    "embedding": {"target_modules": ["q_proj", "embed_tokens"]},
    "dora": {"use_dora": True, "perturb": True},
    "dora+fan_in_fan_out": {
        "gpt2": True,
        "target_modules": GPT2_TARGETS,
        "fan_in_fan_out": True,
        "use_dora": True,
        "perturb": True,
    },
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_equals_peft_merge_and_unload(variant: str, tmp_path: Path) -> None:
    settings = dict(VARIANTS[variant])
    gpt2 = settings.pop("gpt2", False)
    base = base_model(tmp_path / "base", gpt2=gpt2)
    lora = adapter(base, tmp_path / "lora", seed=1, **settings)
    expected = load_file(str(peft_merged(base, lora, tmp_path / "merged") / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    ckpt = open_input(str(lora), base=str(base))
    try:
        assert isinstance(ckpt, AdapterCheckpoint)
        assert sorted(ckpt.tensors) == sorted(expected)
        changed = 0
        for name, want in expected.items():
            got = ckpt.tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            torch.testing.assert_close(got, want, msg=f"{variant}: {name}")
            changed += not torch.equal(want, original[name])
    finally:
        ckpt.close()
    # every patched module and saved copy changed its tensor (the check is not vacuous)
    assert changed == len(ckpt.layout.patches.keys() | ckpt.layout.whole.keys()) > 0
