"""MC-SMoE's low-rank + sparse step on the tiny zoo's own MoE (8 experts trained from scratch):
the decomposition against a naive one, the compressed folder's exact size, and its
decompressed model against the dense merge decomposed tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from zoo.conftest import zoo_tiny

from amalgam.compress import losparse
from amalgam.compress.folder import MANIFEST
from amalgam.compress.moe_compress import compress_moe
from amalgam.compress.stage import decompress_model
from amalgam.evaluate.taskdir import read_split
from amalgam.recipe import CompressSpec

__all__ = ["zoo_tiny"]


def naive(w: torch.Tensor, rank: int, density: float) -> tuple[torch.Tensor, set[int]]:
    """U_r diag(s_r) V_r^T plus the residual's largest entries, picked by a sort of all."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    low = sum(s[i] * torch.outer(u[:, i], vh[i]) for i in range(rank))
    residual = (w - low).reshape(-1).tolist()
    k = round(density * len(residual))
    keep = sorted(range(len(residual)), key=lambda i: (-abs(residual[i]), i))[:k]
    sparse = torch.zeros(len(residual))
    for i in keep:
        sparse[i] = residual[i]
    return low + sparse.reshape(w.shape), set(keep)


@pytest.mark.parametrize(("rank", "density"), [(2, 0.2), (1, 0.0), (3, 0.5)])
def test_decomposition_equals_a_naive_one(rank: int, density: float) -> None:
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(rank))
    parts = losparse.losparse(w, rank, density)
    expected, keep = naive(w, rank, density)
    assert parts.u.shape == (7, rank) and parts.v.shape == (rank, 5)
    assert set(parts.positions.tolist()) == keep
    assert torch.allclose(parts.dense(), expected, atol=1e-5)
    stored = dict(losparse.encode("w", parts))
    back = losparse.decode(
        (7, 5),
        len(keep),
        *(stored["w" + p] for p in (losparse.U, losparse.V, ":positions", losparse.VALUES)),
    )
    assert torch.equal(back.dense(), parts.dense())


@pytest.fixture(scope="module")
def calibration(zoo_tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calibration.jsonl"
    lines = [
        json.dumps({"text": r["prompt"]})
        for task in zoo_tiny.task_names
        for r in read_split(zoo_tiny.tasks_dir, task, "validation")[:4]
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return out


def test_compressed_folder_is_exact_and_decompresses_to_the_decomposed_merge(
    zoo_tiny, calibration: Path, tmp_path: Path
) -> None:
    settings = dict(method="mc_smoe", experts=4, calibration=str(calibration))
    dense = compress_moe(str(zoo_tiny.moe), str(tmp_path / "dense"), CompressSpec(**settings))
    spec = CompressSpec(**settings, losparse_rank=4, losparse_density=0.05)
    packed = compress_moe(str(zoo_tiny.moe), str(tmp_path / "packed"), spec)
    report = packed.report
    files = {p.name: p.stat().st_size for p in (tmp_path / "packed").iterdir()}
    assert report["files"] == {n: files[n] for n in report["files"]}
    assert MANIFEST in report["files"] and report["bytes_after"] == sum(report["files"].values())
    assert report["bytes_after"] < dense.report["bytes_after"]
    assert report["stored_params"] < report["params_after"] == dense.report["params_after"]
    assert compress_moe(str(zoo_tiny.moe), str(tmp_path / "packed"), spec).skipped

    out = tmp_path / "rebuilt"
    decompress_model(str(tmp_path / "packed"), None, str(out))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_local_experts == 4
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    rebuilt, merged = tensors(out), tensors(tmp_path / "dense")
    assert rebuilt.keys() == merged.keys()
    experts = [n for n in merged if ".experts." in n]
    assert experts
    for name, weights in merged.items():
        if name in experts:
            expected = losparse.losparse(weights, 4, 0.05).dense()
            assert torch.allclose(rebuilt[name], expected, atol=1e-6), name
        else:
            assert torch.equal(rebuilt[name], weights), name


def test_the_stages_compress_then_decompress_it_for_scoring(
    zoo_tiny, calibration: Path, tmp_path: Path, monkeypatch
) -> None:
    from amalgam.checkpoint import open_checkpoint
    from amalgam.recipe import parse_recipe
    from amalgam.stages import CompressInput, CompressStage
    from amalgam.stages.evaluate import decompressed
    from amalgam.stages.merge import Merged

    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    with open_checkpoint(str(zoo_tiny.moe)) as ckpt:
        merged = Merged(str(zoo_tiny.moe), ckpt.content_hash(), skipped=True)
    compress = {
        "method": "mc_smoe",
        "experts": 4,
        "calibration": str(calibration),
        "losparse_rank": 4,
        "losparse_density": 0.05,
        "output": str(tmp_path / "small"),
    }
    recipe = parse_recipe(
        {"method": "linear", "models": [{"uri": str(zoo_tiny.moe)}], "compress": compress}
    )
    stage, inp = CompressStage(), CompressInput(recipe, merged)
    out = stage.run(inp)
    assert stage.done(inp) is not None
    dense = decompressed(recipe, out.output)
    assert dense != out.output
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    assert model.config.num_local_experts == 4


@pytest.mark.parametrize(
    ("compress", "message"),
    [
        ({"method": "compeft", "losparse_rank": 4}, "losparse_rank compresses mc_smoe"),
        ({"method": "mc_smoe", "experts": 2, "losparse_density": 0.1}, "needs losparse_rank"),
    ],
)
def test_losparse_settings_out_of_place_are_named(compress: dict, message: str) -> None:
    from amalgam.errors import RecipeError
    from amalgam.recipe import parse_recipe

    with pytest.raises(RecipeError, match=message):
        parse_recipe({"method": "linear", "models": [{"uri": "a"}], "compress": compress})


def test_the_cli_compresses_and_decompresses(
    zoo_tiny, calibration: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from tests.helpers import run_cli

    packed, dense = tmp_path / "packed", tmp_path / "dense"
    args = ["--method", "mc_smoe", "--experts", "2", "--calibration", str(calibration)]
    args += ["--losparse-rank", "2", "--losparse-density", "0.1", "--output", str(packed)]
    code, stdout, _ = run_cli(["compress", str(zoo_tiny.moe), *args, "--json"], monkeypatch, capsys)
    assert (
        code == 0
        and json.loads(stdout)["bytes_after"]
        == sum(p.stat().st_size for p in packed.glob("compressed-*.safetensors"))
        + (packed / MANIFEST).stat().st_size
    )
    code, _, _ = run_cli(["decompress", str(packed), "--output", str(dense)], monkeypatch, capsys)
    assert code == 0
    assert AutoModelForCausalLM.from_pretrained(dense).config.num_local_experts == 2
    capsys.readouterr()  # the loader's progress bar
    code, _, err = run_cli(
        [
            "compress",
            str(zoo_tiny.moe),
            *args[:6],
            "--losparse-density",
            "0.1",
            "--output",
            str(tmp_path / "x"),
        ],
        monkeypatch,
        capsys,
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "needs losparse_rank" in lines[0]
