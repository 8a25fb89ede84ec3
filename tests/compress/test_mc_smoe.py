"""MC-SMoE (arXiv 2310.01334) on an MoE built from the tiny zoo's experts: routing statistics
against a naive count, grouping and alignment against hand-worked and brute-force cases, the
folded router against the stated rule, the output in transformers against a naive
re-implementation of the compressed model, skip when done, a killed run, and bad inputs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from zoo.conftest import zoo_tiny

from amalgam.compress import CompressError
from amalgam.compress.mc_smoe import dominant_groups, merge_group, permutation_to
from amalgam.compress.moe_compress import compress_moe
from amalgam.compress.routing import cached_routing
from amalgam.moe import build_moe, parse_moe_config
from amalgam.recipe import CompressSpec
from tests.faults.kills import KILLED, process_env, run_process, work_folders

__all__ = ["zoo_tiny"]

TASKS = ["zoo_sort", "zoo_caesar", "zoo_vowels", "zoo_mulmod"]


@pytest.fixture(scope="module")
def moe(zoo_tiny, tmp_path_factory) -> Path:
    """A 4-expert Mixtral MoE of the tiny zoo's experts, routers from 4 train prompts each."""
    from amalgam.evaluate.taskdir import read_split

    out = tmp_path_factory.mktemp("moe") / "moe"
    experts = [
        {
            "source_model": str(zoo_tiny.experts[t]),
            "positive_prompts": [
                r["prompt"] for r in read_split(zoo_tiny.tasks_dir, t, "train")[:4]
            ],
        }
        for t in TASKS
    ]
    config = {"base_model": str(zoo_tiny.base), "gate_mode": "hidden", "experts": experts}
    build_moe(parse_moe_config(config), str(out))
    return out


@pytest.fixture(scope="module")
def calibration(zoo_tiny, tmp_path_factory) -> Path:
    """Validation prompts of the four tasks, interleaved (8 each)."""
    from amalgam.evaluate.taskdir import read_split

    path = tmp_path_factory.mktemp("calib") / "calibration.jsonl"
    records = [read_split(zoo_tiny.tasks_dir, t, "validation")[:8] for t in TASKS]
    lines = [
        json.dumps({"text": r["prompt"]}) for group in zip(*records, strict=True) for r in group
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def spec(calibration: Path, **extra) -> CompressSpec:
    return CompressSpec(method="mc_smoe", calibration=str(calibration), **{"experts": 2, **extra})


@pytest.fixture(scope="module")
def compressed(moe: Path, calibration: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mc") / "out"
    compress_moe(str(moe), str(out), spec(calibration))
    return out


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def calibration_ids(moe: Path, calibration: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(moe)
    texts = [json.loads(line)["text"] for line in calibration.read_text().splitlines()]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_routing_statistics_equal_a_naive_count(moe: Path, calibration: Path) -> None:
    info, _ = cached_routing(str(moe), str(calibration), 256)
    model = load(moe)
    caught: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: caught[i].append(o[0].clone()))
    with torch.inference_mode():
        for ids in calibration_ids(moe, calibration):
            model(input_ids=torch.tensor([ids]))
    with safe_open(info.uri, "pt") as f:
        for i in (0, 1):
            z = torch.cat(caught[i]).double()
            counts = [0] * 4
            for row in z.tolist():  # top-2 by sorting each token's logits
                for e in sorted(range(4), key=lambda e: -row[e])[:2]:
                    counts[e] += 1
            gate = f"model.layers.{i}.block_sparse_moe.gate.weight"
            assert f.get_tensor(f"{gate}.counts").tolist() == counts
            cos = torch.tensor(
                [
                    [float(torch.cosine_similarity(z[:, a], z[:, b], 0)) for b in range(4)]
                    for a in range(4)
                ],
                dtype=torch.float64,
            )
            gram = f.get_tensor(f"{gate}.logit_gram").double()
            norms = gram.diagonal().sqrt()
            assert torch.allclose(gram / norms[:, None] / norms[None, :], cos, atol=1e-5)
    again, computed = cached_routing(str(moe), str(calibration), 256)
    assert not computed and again.content_hash == info.content_hash


def test_grouping_is_one_shot_to_the_most_similar_dominant() -> None:
    freq = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    sim = torch.eye(5)
    sim[0, 3], sim[2, 1], sim[4, 3], sim[4, 1] = 0.9, 0.8, 0.7, 0.6
    # dominants: 1 and 3 (most used); 0 -> 3, 2 -> 1, 4 -> 3 (0.7 > 0.6)
    assert dominant_groups(freq, sim, 2) == [[1, 2], [3, 0, 4]]
    assert dominant_groups(freq, sim, 5) == [[0], [1], [2], [3], [4]]


def test_alignment_is_the_best_permutation_and_merge_is_frequency_weighted() -> None:
    g = torch.Generator().manual_seed(0)
    ref = {p: torch.randn(5, 3, generator=g) for p in ("gate", "up")}
    ref["down"] = torch.randn(3, 5, generator=g)
    other = {p: torch.randn_like(w) for p, w in ref.items()}

    def score(perm: tuple[int, ...]) -> float:
        p = list(perm)
        return float(
            (ref["gate"] * other["gate"][p]).sum()
            + (ref["up"] * other["up"][p]).sum()
            + (ref["down"] * other["down"][:, p]).sum()
        )

    best = max(itertools.permutations(range(5)), key=score)
    assert permutation_to(ref, other).tolist() == list(best)
    # a member that is the dominant with shuffled units merges back to the dominant exactly
    shuffle = [3, 0, 4, 1, 2]
    twin = {"gate": ref["gate"][shuffle], "up": ref["up"][shuffle], "down": ref["down"][:, shuffle]}
    merged, moved = merge_group([ref, twin], [0.25, 0.75], align=True)
    assert all(torch.allclose(merged[p], ref[p]) for p in ref) and moved == [0, 5]
    plain, _ = merge_group([ref, twin], [0.25, 0.75], align=False)
    assert torch.allclose(plain["up"], 0.25 * ref["up"] + 0.75 * twin["up"])


def test_router_and_experts_follow_the_stated_rules(moe: Path, compressed: Path) -> None:
    report = json.loads((compressed / "mc_smoe.json").read_text())
    assert report["experts_before"] == 4 and report["experts"] == 2
    with (
        safe_open(str(moe / "model.safetensors"), "pt") as src,
        safe_open(str(compressed / "model.safetensors"), "pt") as out,
    ):
        for layer in ("0", "1"):
            groups = report["layers"][layer]["groups"]
            freq = report["layers"][layer]["frequency"]
            prefix = f"model.layers.{layer}.block_sparse_moe"
            # folded router: group g keeps its dominant expert's row
            rows = src.get_tensor(f"{prefix}.gate.weight")[[g[0] for g in groups]]
            assert torch.equal(out.get_tensor(f"{prefix}.gate.weight"), rows)
            for g, group in enumerate(groups):
                assert freq[group[0]] == max(freq[e] for e in group)
                w = {
                    e: {
                        p: src.get_tensor(f"{prefix}.experts.{e}.{n}.weight")
                        for p, n in (("gate", "w1"), ("up", "w3"), ("down", "w2"))
                    }
                    for e in group
                }
                total = sum(freq[e] for e in group)
                want = torch.zeros_like(w[group[0]]["up"])
                for e in group:
                    p = permutation_to(w[group[0]], w[e]) if e != group[0] else slice(None)
                    want += freq[e] / total * w[e]["up"][p]
                assert torch.allclose(
                    out.get_tensor(f"{prefix}.experts.{g}.w3.weight"), want, atol=1e-6
                )


def naive_block(
    hidden: torch.Tensor, gate: torch.Tensor, experts: list[dict], k: int
) -> torch.Tensor:
    """Top-k of the softmax router, weights renormalised, SwiGLU experts, token by token."""
    out = torch.zeros_like(hidden)
    flat, result = hidden.reshape(-1, hidden.shape[-1]), out.view(-1, hidden.shape[-1])
    for t, x in enumerate(flat):
        probs = torch.softmax(gate @ x, dim=-1)
        top = sorted(range(len(probs)), key=lambda e: -float(probs[e]))[:k]
        norm = sum(float(probs[e]) for e in top)
        for e in top:
            w = experts[e]
            y = w["down"] @ (torch.nn.functional.silu(w["gate"] @ x) * (w["up"] @ x))
            result[t] += float(probs[e]) / norm * y
    return out


def test_output_loads_and_equals_a_naive_compressed_model(
    moe: Path, compressed: Path, calibration: Path
) -> None:
    report = json.loads((compressed / "mc_smoe.json").read_text())
    small = load(compressed)
    assert small.config.num_local_experts == 2
    assert sum(p.numel() for p in small.parameters()) == report["params_after"]
    assert (
        report["params_after"] < report["params_before"]
        and report["bytes_after"] < report["bytes_before"]
    )
    # naive: the original model, each sparse block replaced by a hand-written one over the
    # groups' merged weights (frequency-weighted, aligned by an independent LAP)
    from scipy.optimize import linear_sum_assignment

    original = load(moe)
    batch = torch.tensor([ids[:8] for ids in calibration_ids(moe, calibration)[:4]])
    with torch.inference_mode():
        assert not torch.allclose(small(input_ids=batch).logits, original(input_ids=batch).logits)
    with safe_open(str(moe / "model.safetensors"), "pt") as src:
        for i, layer in enumerate(original.model.layers):
            groups = report["layers"][str(i)]["groups"]
            freq = report["layers"][str(i)]["frequency"]
            prefix = f"model.layers.{i}.block_sparse_moe"
            gate = src.get_tensor(f"{prefix}.gate.weight")[[g[0] for g in groups]]
            experts = []
            for group in groups:

                def read(e: int, n: str, prefix: str = prefix) -> torch.Tensor:
                    return src.get_tensor(f"{prefix}.experts.{e}.{n}.weight")

                d = {
                    "gate": read(group[0], "w1"),
                    "up": read(group[0], "w3"),
                    "down": read(group[0], "w2"),
                }
                total = sum(freq[e] for e in group)
                acc = {p: freq[group[0]] / total * v for p, v in d.items()}
                for e in group[1:]:
                    m = {"gate": read(e, "w1"), "up": read(e, "w3"), "down": read(e, "w2")}
                    cost = (
                        torch.einsum("id,jd->ij", d["gate"], m["gate"])
                        + torch.einsum("id,jd->ij", d["up"], m["up"])
                        + torch.einsum("di,dj->ij", d["down"], m["down"])
                    )
                    _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
                    acc["gate"] += freq[e] / total * m["gate"][cols]
                    acc["up"] += freq[e] / total * m["up"][cols]
                    acc["down"] += freq[e] / total * m["down"][:, cols]
                experts.append(acc)
            layer.mlp.forward = lambda h, gate=gate, experts=experts: naive_block(
                h, gate, experts, 2
            )
    with torch.inference_mode():
        assert torch.allclose(
            small(input_ids=batch).logits, original(input_ids=batch).logits, atol=1e-4
        )


def test_same_settings_skip_and_baselines_differ(
    moe: Path, calibration: Path, compressed: Path, tmp_path: Path
) -> None:
    again = compress_moe(str(moe), str(compressed), spec(calibration))
    assert again.skipped
    drop = compress_moe(str(moe), str(tmp_path / "drop"), spec(calibration, expert_merge="drop"))
    with (
        safe_open(str(moe / "model.safetensors"), "pt") as src,
        safe_open(str(tmp_path / "drop" / "model.safetensors"), "pt") as out,
    ):
        groups = drop.report["layers"]["0"]["groups"]
        name = "model.layers.0.block_sparse_moe.experts.{}.w2.weight"
        assert torch.equal(
            out.get_tensor(name.format(1)), src.get_tensor(name.format(groups[1][0]))
        )
    assert drop.content_hash != again.content_hash


KILL = (
    "import sys\n"
    "from amalgam.compress.moe_compress import compress_moe\n"
    "from amalgam.recipe import CompressSpec\n"
    "spec = CompressSpec(method='mc_smoe', experts=2, calibration=sys.argv[2])\n"
    "compress_moe(sys.argv[1], sys.argv[3], spec, max_shard_size=100_000)\n"
)


def test_a_killed_run_leaves_nothing_and_a_rerun_completes(
    moe: Path, calibration: Path, compressed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    env = process_env(tmp_path / "home", kill="amalgam.writer:ShardWriter.write:12")
    done = run_process(["-c", KILL, str(moe), str(calibration), str(out)], env)
    assert done.code == KILLED, done.tail
    assert not out.exists() and work_folders(str(tmp_path))
    result = compress_moe(str(moe), str(out), spec(calibration), max_shard_size=100_000)
    assert not result.skipped and not work_folders(str(tmp_path))
    assert len(list(out.glob("model-*.safetensors"))) > 1
    with safe_open(str(compressed / "model.safetensors"), "pt") as ref:
        for shard in out.glob("model-*.safetensors"):
            with safe_open(str(shard), "pt") as f:
                assert all(torch.equal(f.get_tensor(n), ref.get_tensor(n)) for n in f.keys())  # noqa: SIM118 (safe_open is not iterable)


def test_a_dense_model_is_refused(zoo_tiny, calibration: Path, tmp_path: Path) -> None:
    with pytest.raises(CompressError, match=r"model_type 'llama' is not a mixture of experts"):
        compress_moe(str(zoo_tiny.base), str(tmp_path / "o"), spec(calibration))


def test_missing_calibration_data_is_named(moe: Path, tmp_path: Path) -> None:
    with pytest.raises(CompressError, match=r"compress\.calibration: mc_smoe needs"):
        compress_moe(str(moe), str(tmp_path / "o"), CompressSpec(method="mc_smoe", experts=2))
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(CompressError, match=rf"compress\.calibration: .*{missing.name}: no such"):
        compress_moe(str(moe), str(tmp_path / "o"), spec(missing))
    assert not (tmp_path / "o").exists()


def test_more_experts_than_the_model_has_is_refused(
    moe: Path, calibration: Path, tmp_path: Path
) -> None:
    with pytest.raises(CompressError, match=r"compress\.experts: 5 is more than the 4 experts"):
        compress_moe(str(moe), str(tmp_path / "o"), spec(calibration, experts=5))


def test_the_compress_stage_runs_mc_smoe_then_finds_it_done(
    zoo_tiny, moe: Path, calibration: Path, tmp_path: Path
) -> None:
    from amalgam.checkpoint import open_checkpoint
    from amalgam.recipe import parse_recipe
    from amalgam.stages import CompressInput, CompressStage
    from amalgam.stages.merge import Merged

    with open_checkpoint(str(moe)) as ckpt:
        merged = Merged(str(moe), ckpt.content_hash(), skipped=True)
    recipe = parse_recipe(
        {
            "method": "linear",
            "models": [{"uri": str(zoo_tiny.experts[t])} for t in TASKS[:2]],
            "compress": {
                "method": "mc_smoe",
                "experts": 3,
                "calibration": str(calibration),
                "output": str(tmp_path / "small"),
            },
        }
    )
    stage, inp = CompressStage(), CompressInput(recipe, merged)
    assert stage.done(inp) is None
    out = stage.run(inp)
    assert not out.skipped and out.details["experts"] == 3
    assert "3 experts per layer" in stage.report(inp, out).markdown["compression"]
    again = stage.done(inp)
    assert again is not None and again.skipped
    calibration.write_text(calibration.read_text())  # same records: still done
    assert stage.done(inp) is not None
    from amalgam.stages.evaluate import decompressed

    assert decompressed(recipe, out.output) == out.output  # scored as it is


def test_an_averaged_router_row_is_the_members_rows_weighted_by_frequency(
    moe: Path, calibration: Path, tmp_path: Path
) -> None:
    result = compress_moe(str(moe), str(tmp_path / "avg"), spec(calibration, router_fold="average"))
    name = "model.layers.1.block_sparse_moe.gate.weight"
    with (
        safe_open(str(moe / "model.safetensors"), "pt") as src,
        safe_open(str(tmp_path / "avg" / "model.safetensors"), "pt") as out,
    ):
        gate, folded = src.get_tensor(name), out.get_tensor(name)
    freq = result.report["layers"]["1"]["frequency"]
    for g, group in enumerate(result.report["layers"]["1"]["groups"]):
        total = sum(freq[e] for e in group)
        row = torch.zeros(gate.shape[1])
        for e in group:
            row += freq[e] / total * gate[e]
        assert torch.allclose(folded[g], row, atol=1e-6)


def test_qwen2_moe_keeps_its_shared_expert(zoo_tiny, calibration: Path, tmp_path: Path) -> None:
    """Qwen2-MoE naming from its config (``num_experts``, ``mlp.experts.N.*_proj``): fewer
    experts, the shared expert and its gate as they were, loaded by transformers."""
    from transformers import Qwen2MoeForCausalLM

    experts = [{"source_model": str(zoo_tiny.experts[t])} for t in TASKS[:3]]
    shared = [{"source_model": str(zoo_tiny.base)}]
    config = {"base_model": str(zoo_tiny.base), "gate_mode": "random", "experts": experts}
    qwen = tmp_path / "qwen"
    build_moe(parse_moe_config(config | {"shared_experts": shared}), str(qwen))
    result = compress_moe(str(qwen), str(tmp_path / "small"), spec(calibration))
    model = load(tmp_path / "small")
    assert isinstance(model, Qwen2MoeForCausalLM) and model.config.num_experts == 2
    assert sum(p.numel() for p in model.parameters()) == result.report["params_after"]
    with (
        safe_open(str(qwen / "model.safetensors"), "pt") as src,
        safe_open(str(tmp_path / "small" / "model.safetensors"), "pt") as out,
    ):
        assert not any(".experts.2." in n for n in out.keys())  # noqa: SIM118
        for n in src.keys():  # noqa: SIM118
            if "shared_expert" in n:
                assert torch.equal(out.get_tensor(n), src.get_tensor(n))
        groups = result.report["layers"]["0"]["groups"]
        gate = src.get_tensor("model.layers.0.mlp.gate.weight")[[g[0] for g in groups]]
        assert torch.equal(out.get_tensor("model.layers.0.mlp.gate.weight"), gate)


def test_the_cli_compresses_an_moe_and_names_bad_input(
    zoo_tiny, moe: Path, calibration: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from tests.helpers import run_cli

    out = tmp_path / "cli"
    args = ["--method", "mc_smoe", "--calibration", str(calibration), "--output", str(out)]
    code, stdout, _ = run_cli(
        ["compress", str(moe), *args, "--experts", "3", "--json"], monkeypatch, capsys
    )
    assert code == 0 and json.loads(stdout)["params_after"] < json.loads(stdout)["params_before"]
    code, _, err = run_cli(
        ["compress", str(zoo_tiny.base), *args[:-1], str(tmp_path / "x"), "--experts", "2"],
        monkeypatch,
        capsys,
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "is not a mixture of experts" in lines[0] and not (tmp_path / "x").exists()


def test_all_experts_kept_is_the_input_and_one_expert_routes_top_1(
    moe: Path, calibration: Path, tmp_path: Path
) -> None:
    compress_moe(str(moe), str(tmp_path / "all"), spec(calibration, experts=4))
    with (
        safe_open(str(moe / "model.safetensors"), "pt") as src,
        safe_open(str(tmp_path / "all" / "model.safetensors"), "pt") as out,
    ):
        assert sorted(out.keys()) == sorted(src.keys())
        assert all(torch.equal(out.get_tensor(n), src.get_tensor(n)) for n in src.keys())  # noqa: SIM118
    compress_moe(str(moe), str(tmp_path / "one"), spec(calibration, experts=1))
    model = load(tmp_path / "one")
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (1, 1)
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=torch.tensor([[2, 5, 7]])).logits).all()
