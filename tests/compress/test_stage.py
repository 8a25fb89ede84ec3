"""Compress and decompress whole checkpoints: reconstruction, exact sizes, sharding, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from amalgam.checkpoint import open_checkpoint
from amalgam.compress import CompressError, compress_model, decompress_model, read_manifest
from amalgam.errors import OutputError
from amalgam.recipe import CompressSpec
from tests.helpers import family, llama_tensors, run_cli, write_model


def naive_reconstruction(base: torch.Tensor, model: torch.Tensor, density: float) -> torch.Tensor:
    """An independent formulation: sort |tau| descending, keep the first ceil(d*n) nonzero
    entries, put the mean kept magnitude with each entry's sign, add to the base."""
    tau = (model.float() - base.float()).reshape(-1).tolist()
    k = min(math.ceil(density * len(tau) - 1e-9), sum(1 for x in tau if x != 0))
    order = sorted(range(len(tau)), key=lambda i: -abs(tau[i]))[:k]
    scale = sum(abs(tau[i]) for i in order) / k
    delta = [0.0] * len(tau)
    for i in order:
        delta[i] = scale if tau[i] > 0 else -scale
    return (base.float() + torch.tensor(delta).reshape(base.shape)).to(model.dtype)


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    base = llama_tensors(0, torch.float32)
    g = torch.Generator().manual_seed(7)
    expert = {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in base.items()
    }
    return write_model(tmp_path / "base", base), write_model(tmp_path / "expert", expert)


def weight_files(folder: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_size
        for p in folder.iterdir()
        if p.suffix == ".safetensors" or p.name == "compression.json"
    }


def test_round_trip_matches_the_naive_reconstruction_and_sizes_are_exact(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    base, expert = models
    result = compress_model(str(expert), str(base), str(tmp_path / "c"), CompressSpec(density=0.25))
    assert result.files == weight_files(tmp_path / "c")
    assert result.compressed_bytes == sum(weight_files(tmp_path / "c").values())
    assert result.dense_bytes == open_checkpoint(str(expert)).nbytes
    assert result.ratio == result.dense_bytes / result.compressed_bytes
    assert (tmp_path / "c" / "config.json").is_file()
    out = decompress_model(str(tmp_path / "c"), None, str(tmp_path / "d"))
    with (
        open_checkpoint(out) as dense,
        open_checkpoint(str(base)) as b,
        open_checkpoint(str(expert)) as e,
    ):
        assert dense.names() == e.names()
        for name in e.names():
            if e.info(name).is_float:
                want = naive_reconstruction(b.tensor(name), e.tensor(name), 0.25)
                torch.testing.assert_close(dense.tensor(name), want, rtol=0, atol=1e-6)
            else:  # integer tensors are stored as they are
                assert torch.equal(dense.tensor(name), e.tensor(name))
    per_tensor = {t.name: t for t in result.tensors}
    q = per_tensor["model.layers.0.self_attn.q_proj.weight"]
    assert (q.encoding, q.numel, q.kept) == ("bitmask", 64, 16)
    assert q.stored_bytes == 64 // 8 + 16 // 8 + 4


def test_bfloat16_models_reconstruct_in_their_dtype(tmp_path: Path) -> None:
    base, (expert, *_) = family(tmp_path, n=1)
    compress_model(str(expert), str(base), str(tmp_path / "c"), CompressSpec(density=0.5))
    out = decompress_model(str(tmp_path / "c"), str(base), str(tmp_path / "d"))
    with open_checkpoint(out) as dense, open_checkpoint(str(expert)) as e:
        for name in e.names():
            assert dense.dtype(name) == e.dtype(name)
            assert dense.shape(name) == e.shape(name)


def test_std_scale_and_keep_dense(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, expert = models
    spec = CompressSpec(density=0.1, scale="std", alpha=3.0, keep_dense=r"layernorm|norm\.weight")
    result = compress_model(str(expert), str(base), str(tmp_path / "c"), spec)
    kinds = {t.name: t.encoding for t in result.tensors}
    assert kinds["model.norm.weight"] == "dense"
    assert kinds["model.layers.1.input_layernorm.weight"] == "dense"
    out = decompress_model(str(tmp_path / "c"), None, str(tmp_path / "d"))
    name = "model.layers.1.mlp.up_proj.weight"
    with (
        open_checkpoint(out) as d,
        open_checkpoint(str(base)) as b,
        open_checkpoint(str(expert)) as e,
    ):
        assert torch.equal(d.tensor("model.norm.weight"), e.tensor("model.norm.weight"))
        tau = e.tensor(name) - b.tensor(name)
        delta = (d.tensor(name) - b.tensor(name)).reshape(-1)
        sigma = tau.reshape(-1).std(correction=0)
        nonzero = delta[delta.abs() > 1e-7]
        assert nonzero.numel() == math.ceil(0.1 * tau.numel())
        torch.testing.assert_close(
            nonzero.abs(), torch.full_like(nonzero, 3.0 * sigma), atol=1e-6, rtol=1e-5
        )


def test_shards_on_both_sides(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, expert = models
    spec = CompressSpec(density=0.3, max_shard_size=40)
    result = compress_model(str(expert), str(base), str(tmp_path / "c"), spec)
    shards = [f for f in result.files if f.endswith(".safetensors")]
    assert len(shards) > 2
    assert result.compressed_bytes == sum(weight_files(tmp_path / "c").values())
    single = decompress_model(str(tmp_path / "c"), None, str(tmp_path / "one"))
    sharded = decompress_model(
        str(tmp_path / "c"), None, str(tmp_path / "many"), max_shard_size=300
    )
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    with open_checkpoint(single) as a, open_checkpoint(sharded) as b:
        assert len(b.files) > 1
        for name in a.names():
            assert torch.equal(a.tensor(name), b.tensor(name))


def test_bad_inputs_name_what_is_wrong(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, expert = models
    other = llama_tensors(1, torch.float32)
    other["model.embed_tokens.weight"] = torch.zeros(20, 8)
    del other["model.norm.weight"]
    odd = write_model(tmp_path / "odd", other)
    with pytest.raises(CompressError) as err:
        compress_model(str(odd), str(base), str(tmp_path / "x"))
    assert "tensor model.embed_tokens.weight has shape [20, 8], the reference [16, 8]" in str(
        err.value
    )
    assert "lacks tensor model.norm.weight" in str(err.value)
    assert not (tmp_path / "x").exists()

    compress_model(str(expert), str(base), str(tmp_path / "c"))
    with pytest.raises(CompressError, match="is not the base this model was compressed against"):
        decompress_model(str(tmp_path / "c"), str(odd), str(tmp_path / "d"))
    with pytest.raises(CompressError, match=r"no compression\.json"):
        decompress_model(str(base), str(base), str(tmp_path / "d"))
    assert not (tmp_path / "d").exists()
    assert (
        read_manifest(str(tmp_path / "c"))["base"]["hash"]
        == open_checkpoint(str(base)).content_hash()
    )
    with pytest.raises(OutputError, match="output overlaps input 'model'"):
        compress_model(str(expert), str(base), str(expert / "inside"))
    with pytest.raises(OutputError, match="output exists"):
        compress_model(str(expert), str(base), str(tmp_path / "c"))
    broken = llama_tensors(0, torch.float32)
    broken["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    nan = write_model(tmp_path / "nan", broken)
    with pytest.raises(CompressError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj.+: NaN"):
        compress_model(str(nan), str(base), str(tmp_path / "y"))
    assert not (tmp_path / "y").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert leftovers == []


def test_cli_compress_and_decompress(
    models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    base, expert = models
    c, d = str(tmp_path / "c"), str(tmp_path / "d")
    args = ["compress", str(expert), "--base", str(base), "--output", c]
    code, out, _ = run_cli([*args, "--density", "0.2", "--json"], monkeypatch, capsys)
    assert code == 0
    assert json.loads(out)["compressed_bytes"] == sum(weight_files(tmp_path / "c").values())
    code, out, _ = run_cli(["decompress", c, "--output", d], monkeypatch, capsys)
    assert code == 0 and (tmp_path / "d" / "model.safetensors").is_file()
    code, _, err = run_cli([*args, "--density", "0", "--overwrite"], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: --density")
    code, _, err = run_cli(["decompress", c, "--output", d], monkeypatch, capsys)
    assert code == 2 and "output exists" in err


def test_a_decompressed_zoo_expert_loads_in_transformers(zoo_tiny, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    task = zoo_tiny.task_names[0]
    expert = str(zoo_tiny.experts[task])
    compress_model(expert, str(zoo_tiny.base), str(tmp_path / "c"), CompressSpec(density=0.2))
    out = decompress_model(str(tmp_path / "c"), None, str(tmp_path / "d"))
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert bool(torch.isfinite(logits).all())
    assert (tmp_path / "d" / "tokenizer.json").read_bytes() == Path(
        expert, "tokenizer.json"
    ).read_bytes()


@pytest.mark.slow
def test_s3_to_s3_equals_local_and_sizes_are_the_stored_objects(
    s3, models: tuple[Path, Path], tmp_path: Path
) -> None:
    import uuid

    base, expert = models
    bucket = f"compress-{uuid.uuid4().hex[:8]}"
    s3.make_bucket(bucket)
    fs, opts = s3.filesystem(), s3.storage_options()
    for folder in (base, expert):
        fs.put(str(folder), f"{bucket}/{folder.name}", recursive=True)
    remote = f"s3://{bucket}"
    spec = CompressSpec(density=0.3, max_shard_size=60)
    result = compress_model(f"{remote}/expert", f"{remote}/base", f"{remote}/c", spec, **opts)
    stored = {p.rsplit("/", 1)[1]: fs.size(p) for p in fs.ls(f"{bucket}/c", detail=False)}
    assert result.files == {n: size for n, size in stored.items() if n in result.files}
    assert result.compressed_bytes == sum(result.files.values())
    decompress_model(f"{remote}/c", None, f"{remote}/d", **opts)
    compress_model(str(expert), str(base), str(tmp_path / "c"), spec)
    decompress_model(str(tmp_path / "c"), None, str(tmp_path / "d"))
    with open_checkpoint(f"{remote}/d", **opts) as a, open_checkpoint(str(tmp_path / "d")) as b:
        assert a.names() == b.names()
        for name in a.names():
            assert torch.equal(a.tensor(name), b.tensor(name))
    assert not [p for p in fs.ls(bucket, detail=False) if ".partial-" in p]
