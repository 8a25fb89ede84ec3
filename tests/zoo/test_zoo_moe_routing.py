"""The zoo's MoE as a test subject: its experts specialise, and the report's routing table is
what a naive recount of the router's choices gives."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amalgam.evaluate import read_split
from amalgam.zoo import PROFILES, Zoo
from amalgam.zoo.routing import task_separation


def test_routing_table_equals_a_naive_recount(zoo_tiny: Zoo) -> None:
    model = AutoModelForCausalLM.from_pretrained(zoo_tiny.moe).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo_tiny.moe)
    shape = PROFILES["tiny"].moe
    assert model.config.num_local_experts == shape.experts == 8
    assert model.config.output_router_logits is False
    inputs: list[torch.Tensor] = []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    expected = {}
    for task in zoo_tiny.task_names[:3]:  # three tasks keep the test to seconds
        counts = torch.zeros(len(model.model.layers), shape.experts)
        for record in read_split(zoo_tiny.tasks_dir, task, "test"):
            inputs.clear()
            ids = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
            for i, (hidden, layer) in enumerate(zip(inputs, model.model.layers, strict=True)):
                logits = hidden[0] @ layer.mlp.gate.weight.T  # (tokens, experts)
                top = torch.argsort(logits, dim=1, descending=True, stable=True)[:, :2]
                counts[i] += torch.bincount(top.reshape(-1), minlength=shape.experts)
        expected[task] = (counts / counts.sum(dim=1, keepdim=True)).tolist()
    reported = json.loads((zoo_tiny.root / "report.json").read_text())["moe_routing"]
    assert list(reported) == zoo_tiny.task_names
    for task, layers in expected.items():
        assert torch.tensor(reported[task]) == pytest.approx(torch.tensor(layers), abs=1e-12)


def test_tasks_are_routed_to_different_experts(zoo_tiny: Zoo) -> None:
    report = json.loads((zoo_tiny.root / "report.json").read_text())
    assert report["moe_task_separation"] == task_separation(report["moe_routing"])
    assert report["moe_task_separation"] > 0.4


def test_task_separation_by_hand() -> None:
    one_layer = {"a": [[1.0, 0.0, 0.0]], "b": [[0.0, 0.5, 0.5]], "c": [[0.5, 0.5, 0.0]]}
    # pairs: a-b 1.0, a-c 0.5, b-c 0.5
    assert task_separation(one_layer) == pytest.approx(2 / 3)
    assert task_separation({"a": [[0.5, 0.5]], "b": [[0.5, 0.5]]}) == 0.0


def test_the_moe_trained_alone_is_the_build_s(zoo_tiny: Zoo, tmp_path) -> None:
    """Benchmarks train the MoE without a build (``train_moe``): same bytes as the build's."""
    from amalgam.zoo.build import prepare_data, save_model, sha256_file, train_moe

    config = PROFILES["tiny"]
    tokenizer, _, pools = prepare_data(config)
    save_model(train_moe(config, tokenizer, pools, log=lambda _: None), tokenizer, tmp_path)
    name = "model.safetensors"
    assert sha256_file(tmp_path / name) == sha256_file(zoo_tiny.moe / name)
