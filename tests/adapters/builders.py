"""Small real models and PEFT adapters for the adapter tests: a synthetic Llama (or GPT-2 for
``fan_in_fan_out``) saved by transformers, adapters trained-like (random A and B, so every
delta is non-zero) saved by PEFT, and PEFT's own ``merge_and_unload`` of each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

LLAMA = dict(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=False,
)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(folder: Path, *, gpt2: bool = False, seed: int = 0, **sizes: Any) -> Path:
    """A seeded float32 Llama (or GPT-2) saved as safetensors with its config."""
    torch.manual_seed(seed)
    if gpt2:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(**{**LLAMA, **sizes}))
    model.save_pretrained(folder)
    return folder


def adapter(base: Path, folder: Path, *, seed: int, perturb: bool = False, **config: Any) -> Path:
    """A PEFT LoRA adapter over ``base`` with random A and B (``config``: LoraConfig fields;
    ``perturb``: also scale DoRA's magnitude vectors and any modules_to_save copy, so the
    merge depends on them)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS, **config}
    peft = get_peft_model(model, LoraConfig(init_lora_weights=False, **settings))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:  # B is as large as A (PEFT's small init would hide mistakes)
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if perturb and ("lora_magnitude_vector" in name or "modules_to_save" in name):
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))
    peft.save_pretrained(folder)
    return folder


def peft_merged(base: Path, adapter_dir: Path, folder: Path) -> Path:
    """PEFT's ``merge_and_unload`` of ``adapter_dir`` over ``base``, saved as a model folder
    holding the base's tensor names."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()
    names = load_file(str(base / "model.safetensors"))
    folder.mkdir(parents=True)
    save_file({k: merged[k].contiguous() for k in names}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text((base / "config.json").read_text())
    return folder


def edit_config(adapter_dir: Path, **fields: Any) -> None:
    """Change fields of an adapter's adapter_config.json."""
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
