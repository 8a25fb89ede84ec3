"""ComPEFT on PEFT adapter folders: factors against zero, saved modules against the base,
restored as an adapter that PEFT loads; bad bases refused in one line with nothing written."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from amalgam.checkpoint import open_checkpoint
from amalgam.compress import CompressError, compress_model, decompress_model, read_manifest
from amalgam.compress.adapter import references
from amalgam.fetch import FetchedModel
from amalgam.recipe import CompressSpec, parse_recipe
from amalgam.stages import CompressInput, CompressStage, execute
from amalgam.stages.merge import Merged
from tests.helpers import llama_tensors, run_cli, write_model

TASK = "zoo_sort"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
HEAD = "base_model.model.lm_head.weight"


def naive_compeft(tau: torch.Tensor, density: float) -> torch.Tensor:
    """An independent formulation of the project's per-tensor rule: sort |tau| descending,
    keep the first ceil(d*n) nonzero entries as sign x the mean kept magnitude, zero the rest."""
    flat = tau.float().reshape(-1).tolist()
    k = min(math.ceil(density * len(flat) - 1e-9), sum(1 for x in flat if x != 0))
    order = sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[:k]
    scale = sum(abs(flat[i]) for i in order) / k
    out = [0.0] * len(flat)
    for i in order:
        out[i] = scale if flat[i] > 0 else -scale
    return torch.tensor(out).reshape(tau.shape)


def with_head(zoo, folder: Path) -> Path:
    """The zoo's adapter plus the output head saved whole (``modules_to_save``): base head +
    a small change."""
    tensors = load_file(str(zoo.loras[TASK] / WEIGHTS))
    head = load_file(str(zoo.base / "model.safetensors"))["lm_head.weight"]
    g = torch.Generator().manual_seed(3)
    tensors[HEAD] = head + 0.01 * torch.randn(head.shape, generator=g)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / WEIGHTS), {"format": "pt"})
    config = json.loads((zoo.loras[TASK] / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    return folder


def logits(zoo, adapter: Path) -> torch.Tensor:
    """Logits of the base with ``adapter`` loaded by PEFT, on a few token ids."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo.base), adapter)
    with torch.no_grad():
        return model.eval()(torch.arange(4, 20).reshape(2, 8)).logits


def test_stored_as_is_the_adapter_comes_back_exactly_and_loads_in_peft(
    zoo_tiny, tmp_path: Path
) -> None:
    adapter = with_head(zoo_tiny, tmp_path / "a")
    spec = CompressSpec(density=1.0, keep_dense=".")
    compress_model(str(adapter), str(zoo_tiny.base), str(tmp_path / "c"), spec)
    out = Path(decompress_model(str(tmp_path / "c"), None, str(tmp_path / "d")))
    assert sorted(p.name for p in out.iterdir()) == [CONFIG, WEIGHTS, "amalgam-commit.json"]
    assert (out / CONFIG).read_text() == (adapter / CONFIG).read_text()
    want, got = load_file(str(adapter / WEIGHTS)), load_file(str(out / WEIGHTS))
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert torch.equal(logits(zoo_tiny, out), logits(zoo_tiny, adapter))


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_restored_factors_equal_a_naive_compeft_of_each_factor(
    zoo_tiny, tmp_path: Path, density: float
) -> None:
    adapter = with_head(zoo_tiny, tmp_path / "a")
    spec = CompressSpec(density=density)
    result = compress_model(str(adapter), str(zoo_tiny.base), str(tmp_path / "c"), spec)
    manifest = read_manifest(str(tmp_path / "c"))
    assert manifest["kind"] == "adapter"
    refs = {k: t["base_tensor"] for k, t in manifest["tensors"].items()}
    assert refs.pop(HEAD) == "lm_head.weight" and set(refs.values()) == {None}
    assert result.dense_bytes == (adapter / WEIGHTS).stat().st_size - _header(adapter / WEIGHTS)
    stored = {
        p.name: p.stat().st_size
        for p in (tmp_path / "c").iterdir()
        if p.suffix == ".safetensors" or p.name == "compression.json"
    }
    assert result.files == stored and result.compressed_bytes == sum(stored.values())
    assert result.ratio == result.dense_bytes / result.compressed_bytes
    out = decompress_model(str(tmp_path / "c"), None, str(tmp_path / "d"))
    base_head = load_file(str(zoo_tiny.base / "model.safetensors"))["lm_head.weight"]
    original, restored = load_file(str(adapter / WEIGHTS)), load_file(str(Path(out) / WEIGHTS))
    for key, t in original.items():
        want = (
            base_head + naive_compeft(t - base_head, density)
            if key == HEAD
            else naive_compeft(t, density)
        )
        assert restored[key].shape == t.shape and restored[key].dtype == t.dtype
        torch.testing.assert_close(restored[key], want, rtol=0, atol=1e-6, msg=key)
    if density < 1.0:  # far fewer bytes than the float32 factors
        assert result.ratio > 2.0


def _header(file: Path) -> int:
    """Bytes of a safetensors file before its data: the length field and the JSON header."""
    return 8 + int.from_bytes(file.read_bytes()[:8], "little")


def test_without_a_base_every_tensor_is_taken_against_zero(zoo_tiny, tmp_path: Path) -> None:
    adapter = with_head(zoo_tiny, tmp_path / "a")
    compress_model(str(adapter), None, str(tmp_path / "c"), CompressSpec(density=0.5))
    manifest = read_manifest(str(tmp_path / "c"))
    assert manifest["base"] is None
    assert {t["base_tensor"] for t in manifest["tensors"].values()} == {None}
    out = decompress_model(str(tmp_path / "c"), None, str(tmp_path / "d"))
    head = load_file(str(adapter / WEIGHTS))[HEAD]
    torch.testing.assert_close(
        load_file(str(Path(out) / WEIGHTS))[HEAD], naive_compeft(head, 0.5), rtol=0, atol=1e-6
    )


def test_each_factor_kind_is_checked_against_the_axis_it_shares_with_the_base(
    zoo_tiny, tmp_path: Path
) -> None:
    """Embedding factors (r x num, dim x r), a LoRA bias and a DoRA magnitude, on the zoo
    base (embedding 373 x 64, up_proj 160 x 64); each factor transposed is refused."""
    up, embed = "model.model.layers.0.mlp.up_proj", "model.model.embed_tokens"
    tensors = {
        f"base_model.{embed}.lora_embedding_A": torch.randn(2, 373),
        f"base_model.{embed}.lora_embedding_B": torch.randn(64, 2),
        f"base_model.{up}.lora_A.weight": torch.randn(2, 64),
        f"base_model.{up}.lora_B.weight": torch.randn(160, 2),
        f"base_model.{up}.lora_B.bias": torch.randn(160),
        f"base_model.{up}.lora_magnitude_vector": torch.rand(160),
    }

    def refs_of(adapter: dict[str, torch.Tensor]) -> dict[str, str | None]:
        folder = tmp_path / f"a{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        save_file(adapter, str(folder / WEIGHTS))
        (folder / CONFIG).write_text((zoo_tiny.loras[TASK] / CONFIG).read_text())
        with open_checkpoint(str(folder)) as a, open_checkpoint(str(zoo_tiny.base)) as b:
            return references(a, b)

    magnitude = f"base_model.{up}.lora_magnitude_vector"
    assert refs_of(tensors) == {k: None for k in tensors if k != magnitude}
    for key in tensors:
        if key != magnitude and tensors[key].dim() == 2:
            turned = {**tensors, key: tensors[key].T.contiguous()}
            with pytest.raises(CompressError, match=f"'{key}' has shape"):
                refs_of(turned)
    bias = f"base_model.{up}.lora_B.bias"
    with pytest.raises(CompressError, match=f"'{bias}' has shape \\[159\\]"):
        refs_of({**tensors, bias: torch.randn(159)})


def test_bad_bases_and_kinds_fail_in_one_line_and_write_nothing(
    zoo_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    adapter = str(with_head(zoo_tiny, tmp_path / "a"))
    other = str(write_model(tmp_path / "other", llama_tensors(0, torch.float32)))
    out = tmp_path / "c"

    def refused(args: list[str], *needles: str) -> None:
        code, _, err = run_cli(args, monkeypatch, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
        assert all(n in lines[0] for n in needles), lines[0]
        assert not out.exists() and not (tmp_path / "d").exists()

    # a base of another model, or of other shapes: the first factor that does not fit is named
    refused(["compress", adapter, "--base", other, "--output", str(out)], "does not hold")
    narrow = load_file(str(zoo_tiny.base / "model.safetensors"))
    down = "model.layers.0.mlp.down_proj.weight"
    narrow[down] = narrow[down][:, :100].contiguous()
    narrow = str(write_model(tmp_path / "narrow", narrow))
    key = f"base_model.model.{down.removesuffix('.weight')}.lora_A.weight"
    refused(["compress", adapter, "--base", narrow, "--output", str(out)], key, "does not fit")
    # an adapter as the base, of an adapter or of a dense model
    lora = str(zoo_tiny.loras[TASK])
    refused(["compress", adapter, "--base", lora, "--output", str(out)], "adapter folder")
    expert = str(zoo_tiny.experts[TASK])
    refused(["compress", expert, "--base", lora, "--output", str(out)], "adapter folder")
    # a saved module whose shape is not the base's
    head = tmp_path / "head"
    shutil.copytree(adapter, head)
    tensors = load_file(str(head / WEIGHTS))
    tensors[HEAD] = tensors[HEAD][:-1]
    save_file(tensors, str(head / WEIGHTS))
    args = ["compress", str(head), "--base", str(zoo_tiny.base), "--output", str(out)]
    refused(args, HEAD, "shape")

    # compressed adapter restored against an adapter; a compressed dense model likewise
    packed = tmp_path / "packed"
    assert run_cli(["compress", adapter, "--output", str(packed)], monkeypatch, capsys)[0] == 0
    out = tmp_path / "d"
    refused(["decompress", str(packed), "--base", lora, "--output", str(out)], "adapter folder")
    dense = tmp_path / "dense"
    compress_model(expert, str(zoo_tiny.base), str(dense), CompressSpec(density=0.2))
    refused(["decompress", str(dense), "--base", lora, "--output", str(out)], "adapter folder")
    # a compressed adapter that lost its config cannot come back as an adapter
    (packed / CONFIG).unlink()
    refused(["decompress", str(packed), "--output", str(out)], CONFIG)
    # the manifest's kind must be one amalgam writes
    manifest = json.loads((dense / "compression.json").read_text())
    (dense / "compression.json").write_text(json.dumps({**manifest, "kind": "lora"}))
    with pytest.raises(CompressError, match="unknown kind 'lora'"):
        decompress_model(str(dense), None, str(out))
    assert not out.exists()


@pytest.mark.slow
def test_an_adapter_on_s3_round_trips_as_it_does_locally(s3, zoo_tiny, tmp_path: Path) -> None:
    import uuid

    bucket = f"compress-adapter-{uuid.uuid4().hex[:8]}"
    s3.make_bucket(bucket)
    fs, opts = s3.filesystem(), s3.storage_options()
    adapter = with_head(zoo_tiny, tmp_path / "a")
    fs.put(str(adapter), f"{bucket}/a", recursive=True)
    fs.put(str(zoo_tiny.base), f"{bucket}/base", recursive=True)
    remote, spec = f"s3://{bucket}", CompressSpec(density=0.3)
    compress_model(f"{remote}/a", f"{remote}/base", f"{remote}/c", spec, **opts)
    decompress_model(f"{remote}/c", None, f"{remote}/d", **opts)
    compress_model(str(adapter), str(zoo_tiny.base), str(tmp_path / "c"), spec)
    decompress_model(str(tmp_path / "c"), None, str(tmp_path / "d"))
    assert fs.cat_file(f"{bucket}/d/{CONFIG}") == (tmp_path / "d" / CONFIG).read_bytes()
    with open_checkpoint(f"{remote}/d", **opts) as a, open_checkpoint(str(tmp_path / "d")) as b:
        assert a.kind == b.kind == "adapter" and a.names() == b.names()
        for name in a.names():
            assert torch.equal(a.tensor(name), b.tensor(name)), name
    assert not [p for p in fs.ls(bucket, detail=False) if ".partial-" in p]


def test_the_compress_stage_compresses_an_adapter_merge(zoo_tiny, tmp_path: Path) -> None:
    adapter = str(zoo_tiny.loras[TASK])
    recipe = parse_recipe(
        {
            "method": "task_arithmetic",
            "base": str(zoo_tiny.base),
            "models": [{"uri": str(zoo_tiny.experts[TASK])}],
            "output": str(tmp_path / "merged"),
            "compress": {"density": 0.3, "output": str(tmp_path / "c")},
        }
    )
    with open_checkpoint(adapter) as a, open_checkpoint(str(zoo_tiny.base)) as b:
        merged = Merged(adapter, a.content_hash(), skipped=True)
        base = FetchedModel("base", str(zoo_tiny.base), b.content_hash(), 1, (), "model")
    packed = CompressInput(recipe, merged, [base])
    done = execute(CompressStage(), packed)
    assert not done.skipped and done.details["ratio"] > 1.0
    assert read_manifest(done.output)["kind"] == "adapter"
    assert execute(CompressStage(), packed).skipped
