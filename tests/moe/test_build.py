"""An MoE built from the tiny zoo's experts: routers against a naive computation, the output in
transformers (parameter count by hand, forward pass against the dense experts), same bytes on
a rebuild, skip when done, and a build killed midway that a rerun completes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from zoo.conftest import zoo_tiny

from amalgam.checkpoint import open_checkpoint
from amalgam.moe import build_moe, parse_moe_config
from amalgam.writer import intact
from tests.faults.kills import KILLED, process_env, run_process, work_folders

__all__ = ["zoo_tiny"]

TASKS = ["zoo_sort", "zoo_caesar", "zoo_vowels"]
PROMPTS = {
    "zoo_sort": (["\u4f5c\u4f58\u4f41", "\u4f5c\u4f45"], ["\u4f41\u4f42"]),
    "zoo_caesar": (["\u4f41\u4f42\u4f43"], []),
    "zoo_vowels": (["\u4f45\u4f46", "\u4f47"], ["\u4f5c"]),
}


def config(zoo, gate_mode: str = "hidden", **extra) -> dict:
    return {
        "base_model": str(zoo.base),
        "gate_mode": gate_mode,
        "experts_per_token": 2,
        "experts": [
            {
                "source_model": str(zoo.experts[t]),
                "positive_prompts": PROMPTS[t][0],
                "negative_prompts": PROMPTS[t][1],
            }
            for t in TASKS
        ],
        **extra,
    }


@pytest.fixture(scope="module")
def built(zoo_tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "moe"
    build_moe(parse_moe_config(config(zoo_tiny)), str(out))
    return out


def read(folder: Path, name: str) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


def naive_gates(zoo, prompt_sets: list[tuple[list[str], list[str]]]) -> torch.Tensor:
    """The hidden-state rule computed another way: transformers' own loader, a pre-hook on
    every decoder layer catching its input, plain Python sums and norms."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(zoo.base)
    layers = model.model.layers
    caught: dict[int, torch.Tensor] = {}

    def catch(i: int):
        def hook(_module, args, kwargs):
            caught[i] = (args[0] if args else kwargs["hidden_states"])[0, -1].clone()

        return hook

    handles = [
        m.register_forward_pre_hook(catch(i), with_kwargs=True) for i, m in enumerate(layers)
    ]

    def mean_inputs(prompts: list[str]) -> list[torch.Tensor]:
        sums = [torch.zeros(model.config.hidden_size) for _ in layers]
        for p in prompts:
            ids = [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
            for i in range(len(layers)):
                sums[i] += caught[i]
        return [s / len(prompts) for s in sums]

    rows = []
    for pos, neg in prompt_sets:
        v = mean_inputs(pos)
        if neg:
            v = [a - b for a, b in zip(v, mean_inputs(neg), strict=True)]
        rows.append([x / max(float(x.pow(2).sum().sqrt()), 1e-8) for x in v])
    for h in handles:
        h.remove()
    return torch.stack(
        [torch.stack([rows[e][i] for e in range(len(rows))]) for i in range(len(layers))]
    )


def test_hidden_routers_equal_a_naive_computation(zoo_tiny, built: Path) -> None:
    want = naive_gates(zoo_tiny, [PROMPTS[t] for t in TASKS])
    for layer in range(want.shape[0]):
        got = read(built, f"model.layers.{layer}.block_sparse_moe.gate.weight")
        torch.testing.assert_close(got, want[layer], atol=1e-5, rtol=1e-5)


def test_cheap_embed_routers_equal_summed_embedding_rows(zoo_tiny, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "cheap"
    build_moe(parse_moe_config(config(zoo_tiny, "cheap_embed")), str(out))
    tok = AutoTokenizer.from_pretrained(zoo_tiny.base)
    embed = read(zoo_tiny.base, "model.embed_tokens.weight")
    for e, task in enumerate(TASKS):
        pos, neg = PROMPTS[task]
        total = torch.zeros(embed.shape[1])
        for sign, prompts in ((1.0, pos), (-1.0, neg)):
            for p in prompts:
                for i in [tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]]:
                    total += sign * embed[i]
        want = total / total.norm()
        for layer in range(2):
            got = read(out, f"model.layers.{layer}.block_sparse_moe.gate.weight")[e]
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_loads_in_transformers_with_the_expected_parameter_count(zoo_tiny, built: Path) -> None:
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(built, output_loading_info=True)
    assert isinstance(model, MixtralForCausalLM)
    assert not any(info.values()), info  # no tensor missing, unexpected or mismatched
    c = model.config
    assert (c.num_local_experts, c.num_experts_per_tok) == (3, 2)
    # by hand from the base's config: vocab 373, hidden 64, MLP 160, 2 layers, 4 heads of 16,
    # 2 key/value heads, untied head
    v, h, i, layers, kv, experts = 373, 64, 160, 2, 2 * 16, 3
    attention = h * h + h * kv + h * kv + h * h
    per_layer = attention + 2 * h + experts * h + experts * 3 * h * i
    expected = 2 * v * h + layers * per_layer + h
    assert sum(p.numel() for p in model.parameters()) == expected == 257_344
    with open_checkpoint(str(built)) as ckpt:
        assert ckpt.num_params == expected


def dense_hybrid(zoo, task: str):
    """A dense Llama: the base with ``task``'s expert MLPs (what expert ``task`` of the MoE is)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32).eval()
    with safe_open(str(zoo.experts[task] / "model.safetensors"), "pt") as f:
        mlp = {k: f.get_tensor(k) for k in f.keys() if ".mlp." in k}  # noqa: SIM118
    missing, unexpected = model.load_state_dict(mlp, strict=False)
    assert not unexpected and len(missing) > 0
    return model


BATCH = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46], [2, 100, 7, 9, 120, 121, 5, 6]])


@pytest.mark.parametrize("expert", [0, 2])
def test_all_router_weight_on_one_expert_is_that_dense_model(zoo_tiny, built: Path, expert: int):
    from transformers import AutoModelForCausalLM

    moe = AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32).eval()

    def force(_module, _args, output):
        logits, scores, indices = output
        weights = torch.zeros_like(scores)
        weights[:, 0] = 1.0
        return logits, weights, torch.full_like(indices, expert)

    for layer in moe.model.layers:
        layer.mlp.gate.register_forward_hook(force)
    with torch.no_grad():
        got = moe(input_ids=BATCH).logits
        want = dense_hybrid(zoo_tiny, TASKS[expert])(input_ids=BATCH).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def block_io(folder: Path) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the MoE block's input and output on BATCH, the model loaded by transformers."""
    from transformers import AutoModelForCausalLM

    moe = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, layer in enumerate(moe.model.layers):
        layer.mlp.register_forward_hook(
            lambda _m, args, out, i=i: seen.__setitem__(i, (args[0].clone(), out.clone()))
        )
    with torch.no_grad():
        moe(input_ids=BATCH)
    return seen


def dense_mlp(folder: Path, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The dense model's MLP of ``layer`` on ``x``, from its file: down(silu(gate x) * up x)."""
    p = f"model.layers.{layer}.mlp."
    wg, wu, wd = (read(folder, p + f"{n}_proj.weight") for n in ("gate", "up", "down"))
    return (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T


def top2_mixture(zoo, x: torch.Tensor, gate: torch.Tensor, layer: int) -> torch.Tensor:
    """Softmax over the router logits, the top 2 renormalised, their experts' MLPs mixed."""
    top, idx = torch.softmax(x @ gate.T, dim=-1).topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    want = torch.zeros_like(x)
    for e, task in enumerate(TASKS):
        want += (top * (idx == e)).sum(-1, keepdim=True) * dense_mlp(zoo.experts[task], layer, x)
    return want


def test_sparse_block_equals_a_naive_top2_mixture(zoo_tiny, built: Path) -> None:
    """With its own routers, each MoE block's output is the top-2 mixture of the dense
    experts' MLPs, computed from the experts' files."""
    for layer, (x, out) in block_io(built).items():
        gate = read(built, f"model.layers.{layer}.block_sparse_moe.gate.weight")
        torch.testing.assert_close(
            out, top2_mixture(zoo_tiny, x, gate, layer), atol=1e-5, rtol=1e-5
        )


SHARED = (["\u4f41\u4f5c", "\u4f46"], ["\u4f50"])


def test_qwen2_moe_with_a_shared_expert(zoo_tiny, tmp_path: Path) -> None:
    """Qwen2-MoE output (the base as the shared expert, its down projection halved): loads
    with the hand-counted parameters; routers and the shared gate follow the hidden rule; each
    block is the top-2 mixture plus sigmoid(shared gate . x) times the shared MLP."""
    from transformers import AutoModelForCausalLM, Qwen2MoeForCausalLM

    shared = {"source_model": str(zoo_tiny.base), "positive_prompts": SHARED[0]}
    shared |= {"negative_prompts": SHARED[1], "residual_scale": 0.5}
    out = tmp_path / "qwen"
    build_moe(parse_moe_config(config(zoo_tiny) | {"shared_experts": [shared]}), str(out))
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert isinstance(model, Qwen2MoeForCausalLM) and not any(info.values()), info
    v, h, i, layers, kv, experts = 373, 64, 160, 2, 2 * 16, 3
    attention = 2 * h * h + 2 * h * kv  # no q/k/v biases (qkv_bias false)
    per_layer = attention + 2 * h + experts * h + experts * 3 * h * i + 3 * h * i + h
    expected = 2 * v * h + layers * per_layer + h
    assert sum(p.numel() for p in model.parameters()) == expected == 318_912
    want = naive_gates(zoo_tiny, [*(PROMPTS[t] for t in TASKS), SHARED])
    for layer, (x, got) in block_io(out).items():
        p = f"model.layers.{layer}.mlp."
        gate, shared_gate = read(out, p + "gate.weight"), read(out, p + "shared_expert_gate.weight")
        torch.testing.assert_close(gate, want[layer, :3], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shared_gate, want[layer, 3:], atol=1e-5, rtol=1e-5)
        mixed = top2_mixture(zoo_tiny, x, gate, layer)
        mixed += torch.sigmoid(x @ shared_gate.T) * 0.5 * dense_mlp(zoo_tiny.base, layer, x)
        torch.testing.assert_close(got, mixed, atol=1e-5, rtol=1e-5)


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.iterdir()
        if p.suffix in (".safetensors", ".json") and p.name != "moe.json"
    }


def test_same_config_same_bytes_and_skip_when_done(zoo_tiny, built: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    first = build_moe(parse_moe_config(config(zoo_tiny)), str(again))
    assert not first.skipped and digests(again) == digests(built)
    second = build_moe(parse_moe_config(config(zoo_tiny)), str(again))
    assert second.skipped and second.content_hash == first.content_hash
    random_a = build_moe(parse_moe_config(config(zoo_tiny, "random", seed=3)), str(tmp_path / "r1"))
    random_b = build_moe(parse_moe_config(config(zoo_tiny, "random", seed=3)), str(tmp_path / "r2"))
    assert random_a.content_hash == random_b.content_hash != first.content_hash


BUILD = (
    "import sys\n"
    "from amalgam.moe import build_moe, load_moe_config\n"
    "build_moe(load_moe_config(sys.argv[1]), sys.argv[2], max_shard_size=200_000)\n"
)


def test_a_killed_build_leaves_nothing_and_a_rerun_completes(zoo_tiny, tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(config(zoo_tiny)))
    out = tmp_path / "out"
    env = process_env(tmp_path / "home", kill="amalgam.writer:ShardWriter.write:12")
    done = run_process(["-c", BUILD, str(path), str(out)], env)
    assert done.code == KILLED, done.tail
    assert not out.exists() and work_folders(str(tmp_path))  # only its staging folder
    from amalgam.moe import load_moe_config

    result = build_moe(load_moe_config(path), str(out), max_shard_size=200_000)
    assert not result.skipped and intact(*_local(out)) and not work_folders(str(tmp_path))
    reference = tmp_path / "reference"
    build_moe(load_moe_config(path), str(reference), max_shard_size=200_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert digests(out) == digests(reference)


def _local(path: Path):
    from amalgam import storage

    return storage.resolve(str(path))
