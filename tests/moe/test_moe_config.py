"""The MoE config: mergekit-moe's YAML parses; every bad field is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from amalgam.moe import MoEError, load_moe_config, parse_moe_config

MERGEKIT_YAML = """
base_model: base-7b
gate_mode: hidden
dtype: bfloat16
experts_per_token: 2
experts:
  - source_model: chat-7b
    positive_prompts: ["<|im_start|>user\\nHello"]
  - source_model: code-7b
    positive_prompts: ["def fibonacci(n):"]
    negative_prompts: ["Once upon a time"]
"""


def test_mergekit_yaml_parses(tmp_path: Path) -> None:
    path = tmp_path / "moe.yml"
    path.write_text(MERGEKIT_YAML)
    config = load_moe_config(path)
    assert config.base_model == "base-7b" and config.gate_mode == "hidden"
    assert config.dtype == "bfloat16" and config.experts_per_token == 2
    assert [e.source_model for e in config.experts] == ["chat-7b", "code-7b"]
    assert config.experts[0].positive_prompts == ["<|im_start|>user\nHello"]
    assert config.experts[1].negative_prompts == ["Once upon a time"]
    assert config.experts[0].negative_prompts == []


def expert(name: str, prompt: str | None = "x") -> dict:
    return {"source_model": name, **({"positive_prompts": [prompt]} if prompt else {})}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"gate_mod": "hidden"}, "gate_mod"),
        ({"gate_mode": "hidden_avg"}, "gate_mode"),
        ({"experts_per_token": 3}, "experts_per_token: 3 is more than the 2 experts"),
        ({"experts_per_token": 0}, "experts_per_token"),
        ({"experts": [expert("a"), expert("b", None)]}, "experts.1.positive_prompts"),
        ({"experts": [expert("a"), expert("b")]}, "every expert has the same prompts"),
        ({"experts": [{"source_model": "a", "positive_prompt": ["x"]}]}, "positive_prompt"),
        ({"experts": [{"positive_prompts": ["x"]}]}, "experts.0.source_model"),
        ({"architecture": "mixtral", "shared_experts": [expert("s")]}, "Mixtral has no shared"),
        ({"architecture": "qwen moe"}, "shared_experts: Qwen MoE needs exactly one shared"),
        ({"shared_experts": [expert("s"), expert("t")]}, "exactly one shared expert"),
        ({"shared_experts": [expert("s", None)]}, "shared_experts.0.positive_prompts"),
        ({"architecture": "deepseek"}, "architecture: 'deepseek'; amalgam writes Mixtral or Qwen"),
        ({"experts": [{**expert("a"), "noise_scale": 0.1}]}, "experts.0.noise_scale"),
        ({"experts": []}, "experts: at least one expert"),
    ],
)
def test_bad_fields_are_named(change: dict, named: str) -> None:
    data = {"base_model": "b", "experts": [expert("a", "p"), expert("b", "q")], **change}
    with pytest.raises(MoEError) as info:
        parse_moe_config(data, "moe.yml")
    assert str(info.value).startswith("moe.yml: invalid MoE config") and named in str(info.value)


def test_random_needs_no_prompts() -> None:
    config = parse_moe_config(
        {
            "base_model": "b",
            "gate_mode": "random",
            "experts": [expert("a", None), expert("b", None)],
        }
    )
    assert config.gate_mode == "random" and config.seed == 0


def test_the_output_architecture() -> None:
    two = [expert("a", "p"), expert("b", "q")]
    assert parse_moe_config({"base_model": "b", "experts": two}).output_architecture == "mixtral"
    qwen = {"base_model": "b", "experts": two, "shared_experts": [expert("s", "r")]}
    assert parse_moe_config(qwen).output_architecture == "qwen2_moe"
    named = parse_moe_config({**qwen, "architecture": "Qwen"})
    assert named.output_architecture == "qwen2_moe"


def test_the_documented_config_parses() -> None:
    """docs/moe.md's example, as written and with its Qwen2-MoE lines uncommented."""
    import re

    import yaml

    doc = (Path(__file__).resolve().parents[2] / "docs" / "moe.md").read_text()
    text = re.search(r"```yaml\n(.*?)```", doc, re.S).group(1)
    assert parse_moe_config(yaml.safe_load(text)).output_architecture == "mixtral"
    qwen = re.sub(r"^# ?", "", text, flags=re.M)
    config = parse_moe_config(yaml.safe_load(qwen))
    assert config.output_architecture == "qwen2_moe"
    assert config.shared_experts[0].residual_scale == 0.5
