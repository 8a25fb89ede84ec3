"""LoRA extraction: the SVD factors, the PEFT folder it writes, the rank rules and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from amalgam import storage
from amalgam.adapters.extract import ExtractError, extract_lora, truncated_factors
from amalgam.checkpoint import open_checkpoint
from amalgam.writer import intact
from tests.helpers import llama_tensors, run_cli, write_model


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q


def with_spectrum(values: list[float], shape: tuple[int, int]) -> torch.Tensor:
    """A matrix of the given shape whose singular values are ``values``."""
    k = len(values)
    u, v = orthonormal(shape[0], k, 1), orthonormal(shape[1], k, 2)
    return (u * torch.tensor(values, dtype=torch.float64)) @ v.T


def test_factors_equal_a_naive_truncated_svd() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 9, generator=g)
    b, a, kept = truncated_factors(delta, rank=4)
    assert b.shape == (12, 4) and a.shape == (4, 9)
    # naive: the float64 SVD, truncated and multiplied back; energy from the full spectrum
    u, s, vh = torch.linalg.svd(delta.double())
    naive = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    torch.testing.assert_close((b @ a).double(), naive, rtol=0, atol=1e-5)
    assert kept == pytest.approx(float(s[:4].square().sum() / s.square().sum()), rel=1e-6)
    # the square root is split evenly: both factors carry the same norm
    assert float(b.norm()) == pytest.approx(float(a.norm()), rel=1e-5)


def test_a_delta_of_known_rank_is_recovered_exactly_at_that_rank() -> None:
    delta = with_spectrum([5.0, 3.0, 0.5], (20, 16)).float()
    b, a, kept = truncated_factors(delta, rank=3)
    torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-5)
    assert kept == pytest.approx(1.0, abs=1e-6)
    b, a, kept = truncated_factors(delta, rank=50)  # more than the matrix has: all of it
    assert a.shape[0] == 16 and kept == pytest.approx(1.0, abs=1e-6)
    b, a, kept = truncated_factors(torch.zeros(6, 4), rank=2)
    assert not b.any() and not a.any() and kept == 1.0


@pytest.mark.parametrize(
    ("energy", "rank"), [(0.5, 1), (0.75, 1), (0.76, 2), (0.9, 2), (0.95, 3), (0.99, 4), (1.0, 4)]
)
def test_the_energy_threshold_picks_the_smallest_rank_reaching_it(energy: float, rank: int) -> None:
    # energies: 16/21.25 = 0.753, 20/21.25 = 0.941, 21/21.25 = 0.988, then 1
    delta = with_spectrum([4.0, 2.0, 1.0, 0.5], (10, 8)).float()
    b, a, kept = truncated_factors(delta, energy=energy)
    assert a.shape[0] == rank and b.shape[1] == rank
    assert kept >= energy - 1e-6


def make_llama(root: Path, tied: bool = False) -> tuple[Path, Path]:
    """A small random Llama (attention biases on) and a full fine-tune of it: every tensor
    moved, embeddings and norms included."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


@pytest.fixture
def llama(tmp_path: Path) -> tuple[Path, Path]:
    return make_llama(tmp_path)


def logits(folder: Path, ids: torch.Tensor, adapter: Path | None = None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_peft_loads_the_adapter_and_full_rank_equals_the_fine_tune(
    llama: tuple[Path, Path], tmp_path: Path
) -> None:
    base, tuned = llama
    out = tmp_path / "adapter"
    result = extract_lora(str(base), str(tuned), str(out), rank=48)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(base, ids, out), logits(tuned, ids), rtol=0, atol=2e-5)
    assert result.output == str(out) and intact(*storage.resolve(result.output))
    config = json.loads((out / "adapter_config.json").read_text())
    # q, o, gate, up, down at rank 32 (their smaller side); k and v at 16: a rank pattern
    assert config["r"] == config["lora_alpha"] == 32
    assert config["rank_pattern"] == config["alpha_pattern"]
    assert set(config["rank_pattern"]) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj")
    }
    assert set(config["rank_pattern"].values()) == {16}
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert config["lora_bias"] is True
    assert config["base_model_name_or_path"] == str(base)
    assert set(config["modules_to_save"]) == {
        "lm_head",
        "model.embed_tokens",
        "model.norm",
        *(
            f"model.layers.{i}.{n}"
            for i in range(2)
            for n in ("input_layernorm", "post_attention_layernorm")
        ),
    }
    assert all(m.energy == pytest.approx(1.0, abs=1e-6) for m in result.modules)
    with open_checkpoint(str(out)) as adapter:
        q = "base_model.model.model.layers.0.self_attn.q_proj"
        assert adapter.shape(f"{q}.lora_A.weight") == (32, 32)
        assert adapter.shape(f"{q}.lora_B.bias") == (32,)
        assert "base_model.model.model.norm.weight" in adapter.tensors


def test_a_tied_head_follows_its_saved_embedding(tmp_path: Path) -> None:
    base, tuned = make_llama(tmp_path, tied=True)
    out = tmp_path / "adapter"
    result = extract_lora(str(base), str(tuned), str(out), rank=48)
    assert "lm_head" in result.saved
    assert json.loads((out / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(logits(base, ids, out), logits(tuned, ids), rtol=0, atol=2e-5)


def test_low_rank_and_dropped_modules(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = llama
    out = tmp_path / "low"
    result = extract_lora(
        str(base), str(tuned), str(out), rank=4, targets=["q_proj", "v_proj"], save_modules=False
    )
    assert [m.module.rsplit(".", 1)[1] for m in result.modules] == ["q_proj", "v_proj"] * 2
    assert all(m.rank == 4 and 0 < m.energy < 1 for m in result.modules)
    assert result.saved == [] and "model.norm.weight" in result.dropped
    assert "model.layers.0.mlp.up_proj.weight" in result.dropped
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["rank_pattern"] == {}
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(logits(base, ids, out)).all()


def test_cli_extracts_and_bad_input_is_one_line_with_nothing_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    base_tensors = llama_tensors(0, torch.float32)
    base = write_model(tmp_path / "base", base_tensors)
    tuned = {k: v + 0.01 if v.is_floating_point() else v for k, v in base_tensors.items()}
    good = write_model(tmp_path / "tuned", tuned)
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        ["extract-lora", str(base), str(good), "--output", str(out), "--energy", "0.99", "--json"],
        monkeypatch,
        capsys,
    )
    assert code == 0
    summary = json.loads(stdout)
    assert summary["ranks"] == [1]  # a constant shift is rank 1
    assert summary["energy_min"] == pytest.approx(1.0, abs=1e-6)

    wide = dict(tuned, **{"model.layers.1.mlp.up_proj.weight": torch.zeros(12, 9)})
    extra = dict(tuned, **{"model.layers.0.mlp.down_proj.weight": torch.zeros(8, 12)})
    nan = dict(tuned, **{"model.layers.0.self_attn.q_proj.weight": torch.full((8, 8), torch.nan)})
    cases = {
        "wide": (wide, "tensor 'model.layers.1.mlp.up_proj.weight': shape [12, 9] in "),
        "extra": (extra, "tensor 'model.layers.0.mlp.down_proj.weight': in "),
        "nan": (nan, "tensor 'model.layers.0.self_attn.q_proj.weight': NaN or Inf in "),
    }
    for name, (tensors, message) in cases.items():
        model = write_model(tmp_path / name, tensors)
        code, _, err = run_cli(
            ["extract-lora", str(base), str(model), "--output", str(tmp_path / "bad")],
            monkeypatch,
            capsys,
        )
        assert code == 2
        assert err.startswith("error: " + message) and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()
        if name == "extra":
            assert "but not in the base" in err
    code, _, err = run_cli(
        ["extract-lora", str(base), str(good), "--output", str(out)], monkeypatch, capsys
    )
    assert code == 2 and "output exists" in err
    with pytest.raises(ExtractError, match="a PEFT adapter, not a full model"):
        extract_lora(str(base), str(out), str(tmp_path / "x"))
    with pytest.raises(ExtractError, match="either a rank or an energy"):
        extract_lora(str(base), str(good), str(tmp_path / "x"), rank=2, energy=0.5)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.slow
def test_s3_to_s3_equals_local(s3, tmp_path: Path) -> None:
    import uuid

    base_tensors = llama_tensors(0, torch.float32)
    g = torch.Generator().manual_seed(5)
    tuned = {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in base_tensors.items()
    }
    base = write_model(tmp_path / "base", base_tensors)
    model = write_model(tmp_path / "tuned", tuned)
    bucket = f"extract-{uuid.uuid4().hex[:8]}"
    s3.make_bucket(bucket)
    fs, opts = s3.filesystem(), s3.storage_options()
    for folder in (base, model):
        fs.put(str(folder), f"{bucket}/{folder.name}", recursive=True)
    remote = f"s3://{bucket}"
    extract_lora(f"{remote}/base", f"{remote}/tuned", f"{remote}/a", energy=0.8, **opts)
    extract_lora(str(base), str(model), str(tmp_path / "a"), energy=0.8)
    with open_checkpoint(f"{remote}/a", **opts) as a, open_checkpoint(str(tmp_path / "a")) as b:
        assert a.kind == "adapter" and a.names() == b.names()
        for name in a.names():
            assert torch.equal(a.tensor(name), b.tensor(name))
    assert intact(*storage.resolve(f"{remote}/a", **opts))
    assert not [p for p in fs.ls(bucket, detail=False) if ".partial-" in p]
