"""The MoE benchmark's parts: its routing table against a naive count of top-2 choices, and
its memory measurement on a small synthetic build."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from zoo.conftest import zoo_tiny

from amalgam.evaluate.taskdir import read_split
from amalgam.moe import build_moe, parse_moe_config
from tests.helpers import load_benchmark

__all__ = ["zoo_tiny"]

bench = load_benchmark("moe_build")
TASKS = ["zoo_sort", "zoo_caesar", "zoo_vowels"]


def test_routing_table_equals_a_naive_count(zoo_tiny, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "moe"
    experts = [
        {"source_model": str(zoo_tiny.experts[t]), "positive_prompts": [p["prompt"]]}
        for t in TASKS
        for p in read_split(zoo_tiny.tasks_dir, t, "train")[:1]
    ]
    build_moe(parse_moe_config({"base_model": str(zoo_tiny.base), "experts": experts}), str(out))
    table = bench.routing(out, zoo_tiny, TASKS, 4)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    inputs: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda _m, a, i=i: inputs.__setitem__(i, a[0][0]))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        gates = [f.get_tensor(f"model.layers.{i}.block_sparse_moe.gate.weight") for i in range(2)]
    for task in TASKS:
        counts = [[0] * 3 for _ in gates]
        for record in read_split(zoo_tiny.tasks_dir, task, "test")[:4]:
            ids = tok(record["prompt"], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
            for layer, gate in enumerate(gates):
                for token in inputs[layer]:
                    logits = (gate @ token).tolist()
                    for e in sorted(range(3), key=lambda e: -logits[e])[:2]:
                        counts[layer][e] += 1
        for layer in range(2):
            total = sum(counts[layer])
            want = [c / total for c in counts[layer]]
            # shares are float32 divisions in the benchmark
            assert table[task][layer] == pytest.approx(want, abs=1e-6), (task, layer)


def test_memory_measurement_on_a_small_build(tmp_path: Path) -> None:
    args = argparse.Namespace(work=str(tmp_path), hidden=64)
    row = bench.memory(args, 1)
    assert row["output_bytes"] > row["dense_bytes"] > row["largest_tensor_bytes"] == 8192 * 64 * 4
    assert row["peak_rss"] >= row["rss_after_imports"] > 0
    assert not (tmp_path / "memory").exists()
    grown = (row["peak_rss"] - row["rss_after_imports"]) / 1e6
    assert f"| {grown:.1f} MB |" in bench.memory_report([row])
