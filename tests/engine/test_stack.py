"""Slices, frankenmerges and layer swapping: the output's layers are the named source layers
(read back from a real transformers model), merged slices equal the method on the renumbered
tensors, and every bad slice is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from amalgam.engine import MergeOptions, run_merge
from amalgam.engine.stack import open_any
from amalgam.errors import OutputError, PlanError, RecipeError
from amalgam.methods.slerp import slerp_pair
from amalgam.recipe import parse_recipe
from tests.helpers import LLAMA_CONFIG, llama_tensors, run_cli, write_model

OPTIONS = MergeOptions(device="cpu", threads=1)


def layer(state: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Layer ``k``'s tensors, keyed by their name inside the layer."""
    prefix = f"model.layers.{k}."
    return {n[len(prefix) :]: t for n, t in state.items() if n.startswith(prefix)}


@pytest.fixture
def experts(zoo_tiny) -> dict[str, Path]:
    return {"a": zoo_tiny.experts["zoo_sort"], "b": zoo_tiny.experts["zoo_count"]}


def frankenmerge(experts: dict[str, Path], out: Path, **extra) -> dict:
    return {
        "method": "passthrough",
        "models": [{"uri": str(p), "name": k} for k, p in experts.items()],
        "output": str(out),
        **extra,
    }


def test_frankenmerge_loads_and_its_layers_are_the_named_source_layers(experts, tmp_path):
    # a's layers 0-1, then b's layer 1, then a's layer 0 again: 4 layers from two 2-layer models
    slices = [
        {"sources": [{"model": "a", "layers": [0, 2]}]},
        {"sources": [{"model": "b", "layers": [1, 2]}]},
        {"sources": [{"model": "a", "layers": [0, 1]}]},
    ]
    out = tmp_path / "frank"
    run_merge(parse_recipe(frankenmerge(experts, out, slices=slices)), OPTIONS)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    logits = model(torch.tensor([[2, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()
    got = {k: v.detach() for k, v in model.state_dict().items()}
    a = load_file(experts["a"] / "model.safetensors")
    b = load_file(experts["b"] / "model.safetensors")
    for k, (src, j) in enumerate([(a, 0), (a, 1), (b, 1), (a, 0)]):
        want = layer(src, j)
        assert set(layer(got, k)) == set(want)
        for name, t in want.items():
            assert torch.equal(layer(got, k)[name], t), (k, name)
    # embeddings from the first slice's model, final norm and head from the last slice's
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], a["lm_head.weight"])
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])


def test_layer_swap_takes_bottom_layers_from_one_expert(experts, tmp_path):
    out = tmp_path / "swap"
    recipe = frankenmerge(experts, out, layer_swap={"model": "b", "bottom": 1})
    run_merge(parse_recipe(recipe), OPTIONS)
    got = load_file(out / "model.safetensors")
    a = load_file(experts["a"] / "model.safetensors")
    b = load_file(experts["b"] / "model.safetensors")
    for k, src in ((0, b), (1, a)):
        for name, t in layer(src, k).items():
            assert torch.equal(layer(got, k)[name], t), (k, name)
    assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], a["model.norm.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_a_merged_slice_is_the_method_on_the_renumbered_layers(zoo_tiny, tmp_path):
    # slerp of the base's layer 1 with an expert's layer 0, as output layer 0
    base, expert = zoo_tiny.base, zoo_tiny.experts["zoo_sort"]
    out = tmp_path / "slerp"
    recipe = {
        "method": "slerp",
        "base": str(base),
        "models": [{"uri": str(expert), "name": "e"}],
        "params": {"t": 0.3},
        "slices": [
            {"sources": [{"model": "base", "layers": [1, 2]}, {"model": "e", "layers": [0, 1]}]}
        ],
        "output": str(out),
    }
    run_merge(parse_recipe(recipe), OPTIONS)
    got = load_file(out / "model.safetensors")
    w0 = layer(load_file(base / "model.safetensors"), 1)
    w1 = layer(load_file(expert / "model.safetensors"), 0)
    assert set(layer(got, 0)) == set(w0) and not layer(got, 1)
    for name in w0:
        want = slerp_pair(0.3, w0[name].float(), w1[name].float())
        torch.testing.assert_close(layer(got, 0)[name], want.to(w0[name].dtype))
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


def test_per_layer_config_lists_follow_the_slices(tmp_path):
    config = {**LLAMA_CONFIG, "layer_types": ["full_attention", "sliding_attention"]}
    a = write_model(tmp_path / "a", llama_tensors(0), config)
    b = write_model(tmp_path / "b", llama_tensors(1), config)
    out = tmp_path / "out"
    slices = [
        {"sources": [{"model": "a", "layers": [1, 2]}]},
        {"sources": [{"model": "b", "layers": [0, 2]}]},
    ]
    run_merge(parse_recipe(frankenmerge({"a": a, "b": b}, out, slices=slices)), OPTIONS)
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 3
    assert written["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]


def test_a_stacked_input_reopens_from_its_uri(tmp_path):
    # Ray workers reopen the plan's inputs by URI: the stacked view must read the same tensors
    a = write_model(tmp_path / "a", llama_tensors(0))
    b = write_model(tmp_path / "b", llama_tensors(1))
    slices = [
        {"sources": [{"model": "b", "layers": [1, 2]}]},
        {"sources": [{"model": "a", "layers": [0, 2]}]},
    ]
    recipe = parse_recipe(frankenmerge({"a": a, "b": b}, tmp_path / "o", slices=slices))
    from amalgam.engine.inputs import open_recipe_inputs

    inputs = open_recipe_inputs(recipe, OPTIONS)
    (stack,) = inputs.values()
    again = open_any(stack.uri)
    try:
        assert sorted(again.tensors) == sorted(stack.tensors)
        assert len({n for n in stack.tensors if n.startswith("model.layers.2.")}) == 3
        for name in stack.tensors:
            assert torch.equal(again.tensor(name), stack.tensor(name)), name
        assert again.content_hash() == stack.content_hash()
    finally:
        again.close()
        stack.close()


def test_a_range_outside_the_model_names_model_range_and_layer_count(experts, tmp_path):
    slices = [
        {"sources": [{"model": "a", "layers": [0, 2]}]},
        {"sources": [{"model": "b", "layers": [1, 5]}]},
    ]
    recipe = parse_recipe(frankenmerge(experts, tmp_path / "o", slices=slices))
    with pytest.raises(
        PlanError,
        match=r"slices\[1\]\.sources\[0\]: layers \[1, 5\) are outside model 'b' "
        r"\(.*zoo_count\), which has 2 layers",
    ):
        run_merge(recipe, OPTIONS)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "no_such_method"}, "unknown merge method 'no_such_method'"),
        (
            {
                "slices": [
                    {
                        "sources": [
                            {"model": "a", "layers": [0, 1]},
                            {"model": "b", "layers": [0, 1]},
                        ]
                    }
                ]
            },
            r"slices\[0\]: method 'passthrough' takes one source per slice",
        ),
        (
            {"slices": [{"sources": [{"model": "c", "layers": [0, 1]}]}]},
            r"slices\[0\].sources\[0\].model: no input named 'c'",
        ),
        (
            {"slices": [{"sources": [{"model": "a", "layers": [2, 1]}]}]},
            r"expected \[start, end\) with 0 <= start < end",
        ),
        (
            {
                "layer_swap": {"model": "a", "top": 1},
                "slices": [{"sources": [{"model": "a", "layers": [0, 1]}]}],
            },
            "give slices or layer_swap, not both",
        ),
        (
            {
                "method": "linear",
                "slices": [
                    {
                        "sources": [
                            {"model": "a", "layers": [0, 1]},
                            {"model": "b", "layers": [0, 2]},
                        ]
                    }
                ],
            },
            r"slices\[0\]: its sources span different numbers of layers \[1, 2\]",
        ),
        (
            {"method": "linear", "slices": [{"sources": [{"model": "a", "layers": [0, 1]}]}]},
            r"slices\[0\]: method 'linear' merges every input, each once \(a, b\); got a",
        ),
    ],
)
def test_bad_slices_are_one_clear_error(change, message):
    recipe = {
        "method": "passthrough",
        "models": [{"uri": "x/a", "name": "a"}, {"uri": "x/b", "name": "b"}],
        "slices": [{"sources": [{"model": "a", "layers": [0, 1]}]}],
        **change,
    }
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe)


@pytest.mark.slow
def test_a_frankenmerge_on_ray_is_byte_identical_to_local(tmp_path):
    """Ray workers reopen the stacked inputs from their URIs (the plan's ``stack:`` URIs)."""
    a = write_model(tmp_path / "a", llama_tensors(0))
    b = write_model(tmp_path / "b", llama_tensors(1))
    slices = [
        {"sources": [{"model": "a", "layers": [0, 2]}]},
        {"sources": [{"model": "b", "layers": [1, 2]}]},
    ]
    digests = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        recipe = parse_recipe(
            frankenmerge({"a": a, "b": b}, out, slices=slices, max_shard_size=600)
        )
        run_merge(recipe, MergeOptions(executor=executor, device="cpu", unit_bytes=200))
        digests[executor] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert len(digests["local"]) > 2
    assert digests["local"] == digests["ray"]


def test_a_method_over_the_base_stacks_the_base_too(zoo_tiny, tmp_path):
    # nearswap of the base's layer 1 and the expert's layer 0: both stacked, as output layer 0
    base, expert = zoo_tiny.base, zoo_tiny.experts["zoo_sort"]
    out = tmp_path / "near"
    sources = [{"model": "base", "layers": [1, 2]}, {"model": "e", "layers": [0, 1]}]
    recipe = {
        "method": "nearswap",
        "base": str(base),
        "models": [{"uri": str(expert), "name": "e"}],
        "params": {"t": 0.01},
        "slices": [{"sources": sources}],
        "output": str(out),
    }
    run_merge(parse_recipe(recipe), OPTIONS)
    got = layer(load_file(out / "model.safetensors"), 0)
    w0 = layer(load_file(base / "model.safetensors"), 1)
    w1 = layer(load_file(expert / "model.safetensors"), 0)
    for name, a in w0.items():
        w = (0.01 / (a - w1[name]).abs().clamp(min=1e-6)).clamp(0, 1)
        torch.testing.assert_close(got[name], w * w1[name] + (1 - w) * a)
    with pytest.raises(RecipeError, match=r"merges every input, each once \(base, e\); got e"):
        parse_recipe({**recipe, "slices": [{"sources": sources[1:]}]})


def test_cli_plan_names_the_ranges_and_a_bad_range_is_one_error_line(
    experts, tmp_path, monkeypatch, capsys
):
    slices = [
        {"sources": [{"model": "a", "layers": [0, 2]}]},
        {"sources": [{"model": "b", "layers": [1, 2]}]},
    ]
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(frankenmerge(experts, tmp_path / "o", slices=slices)))
    code, out, err = run_cli(["merge", str(path), "--plan"], monkeypatch, capsys)
    assert code == 0, err
    expected = f"'a': stacked layers {experts['a']}[0:2], {experts['b']}[1:2]"
    assert "".join(expected.split()) in "".join(out.split())  # the console wraps long lines
    slices[1]["sources"][0]["layers"] = [1, 3]
    path.write_text(json.dumps(frankenmerge(experts, tmp_path / "o", slices=slices)))
    code, out, err = run_cli(["merge", str(path)], monkeypatch, capsys)
    assert code == 2 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "layers [1, 3) are outside model 'b'" in err and "which has 2 layers" in err


def test_an_output_inside_any_stacked_model_is_refused(tmp_path):
    a = write_model(tmp_path / "a", llama_tensors(0))
    b = write_model(tmp_path / "b", llama_tensors(1))
    slices = [
        {"sources": [{"model": "a", "layers": [0, 1]}]},
        {"sources": [{"model": "b", "layers": [0, 1]}]},
    ]
    recipe = parse_recipe(frankenmerge({"a": a, "b": b}, b / "merged", slices=slices))
    with pytest.raises(OutputError, match="output overlaps input 'a'"):
        run_merge(recipe, OPTIONS)


def test_a_gpt2_frankenmerge_counts_its_layers_in_n_layer(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=16, vocab_size=32)
    folders = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        folders[name] = tmp_path / name
        GPT2LMHeadModel(config).save_pretrained(folders[name])
    slices = [
        {"sources": [{"model": "a", "layers": [0, 2]}]},
        {"sources": [{"model": "b", "layers": [0, 2]}]},
    ]
    out = tmp_path / "out"
    run_merge(parse_recipe(frankenmerge(folders, out, slices=slices)), OPTIONS)
    model = GPT2LMHeadModel.from_pretrained(out)
    assert model.config.n_layer == 4
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    b = load_file(folders["b"] / "model.safetensors")
    got = load_file(out / "model.safetensors")
    for name, t in b.items():
        if ".h.1." in name:
            assert torch.equal(got[name.replace(".h.1.", ".h.3.")], t), name
    assert torch.equal(
        got["transformer.wte.weight"],
        load_file(folders["a"] / "model.safetensors")["transformer.wte.weight"],
    )
