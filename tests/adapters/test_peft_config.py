"""adapter_config.json as amalgam reads it: PEFT's pattern matching and key names, scales, and
one error naming every field it cannot merge."""

from __future__ import annotations

import math

import pytest
from peft.utils.other import get_pattern_key

from amalgam.adapters.peft_config import (
    UNSUPPORTED,
    base_tensor_name,
    parse_adapter_config,
    pattern_key,
    peft_key,
    split_peft_key,
)
from amalgam.errors import CheckpointError

MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.11.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "model.embed_tokens",
    "lm_head",
]
PATTERNS = [
    ["q_proj"],
    ["layers.1.self_attn.q_proj", "q_proj"],
    [r"layers\.1\d?\..*", "down_proj"],
    ["proj"],  # ends a name only after a dot: matches nothing here
    ["mlp.down_proj", "embed_tokens", "head"],
]


@pytest.mark.parametrize("patterns", PATTERNS)
def test_pattern_matching_is_peft_s(patterns: list[str]) -> None:
    for module in MODULES:
        ours = pattern_key(patterns, module)
        theirs = get_pattern_key(patterns, module)  # PEFT returns the name itself on no match
        assert ours == (theirs if theirs in patterns else None), (patterns, module)


def test_rank_alpha_and_scale() -> None:
    config = parse_adapter_config(
        {
            "r": 8,
            "lora_alpha": 16,
            "rank_pattern": {"layers.1.self_attn.q_proj": 4},
            "alpha_pattern": {"down_proj": 2},
        },
        "cfg",
    )
    assert config.scale("model.layers.0.self_attn.q_proj") == 2.0
    assert config.scale("model.layers.1.self_attn.q_proj") == 4.0
    assert config.scale("model.layers.1.mlp.down_proj") == 0.25
    assert config.unmatched_patterns(MODULES[:2]) == ["alpha_pattern entry 'down_proj'"]
    rs = parse_adapter_config({"r": 16, "lora_alpha": 8, "use_rslora": True}, "cfg")
    assert rs.scale("x") == 8 / math.sqrt(16)


def test_keys_round_trip() -> None:
    key = peft_key("model.layers.0.mlp.up_proj", "lora_A.weight")
    assert key == "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    assert split_peft_key(key) == ("model.layers.0.mlp.up_proj", "lora_A.weight")
    assert split_peft_key("base_model.model.lm_head.weight") is None
    assert base_tensor_name("base_model.model.model.embed_tokens.base_layer.weight") == (
        "model.embed_tokens.weight"
    )


def test_every_unmergeable_field_named_in_one_error() -> None:
    data = {"r": 4, "lora_alpha": 8, **{k: [1] for k in UNSUPPORTED}, "peft_type": "IA3"}
    with pytest.raises(CheckpointError) as err:
        parse_adapter_config(data, "x/adapter_config.json")
    message = str(err.value)
    assert "\n" not in message and message.startswith("x/adapter_config.json: ")
    assert all(f"{k}:" in message for k in UNSUPPORTED) and "IA3" in message
