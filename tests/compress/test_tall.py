"""TALL-mask storage: the mask rule and rebuild against numpy, exact sizes, kill and rerun,
and the bad inputs through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from amalgam import storage
from amalgam.checkpoint import open_checkpoint
from amalgam.compress import CompressError, decompress_model, read_manifest
from amalgam.compress.tall import compress_tall
from amalgam.recipe import CompressSpec
from amalgam.writer import intact
from tests.faults.kills import KILLED, process_env, run_process, weights, work_folders
from tests.helpers import family, llama_tensors, run_cli, upload_family, write_model

TASKS = ("alpha", "beta", "gamma")


@pytest.fixture
def experts(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A float32 base and three experts = base + deltas of different sizes per task."""
    base = llama_tensors(0, torch.float32)
    found = {}
    for i, task in enumerate(TASKS):
        g = torch.Generator().manual_seed(10 + i)
        t = {
            k: v + (0.02 + 0.03 * i) * torch.randn(v.shape, generator=g)
            if v.is_floating_point()
            else v
            for k, v in base.items()
        }
        found[task] = str(write_model(tmp_path / task, t))
    return write_model(tmp_path / "base", base), found


def naive(base: Path, experts: dict[str, str], lambdas: dict[str, float]) -> dict:
    """numpy, tensor by tensor: tau_MTL = sum of the task vectors (summed in task order) and
    m_t = |tau_t| > lambda_t |tau_MTL - tau_t|, as bool arrays."""
    b = load_file(str(base / "model.safetensors"))
    models = {t: load_file(str(Path(u) / "model.safetensors")) for t, u in experts.items()}
    out = {}
    for name, theta0 in b.items():
        if theta0.dtype != np.float32:
            continue
        taus = {t: m[name] - theta0 for t, m in models.items()}
        total = np.zeros_like(theta0)
        for tau in taus.values():
            total = total + tau
        masks = {
            t: np.abs(tau) > np.float32(lambdas[t]) * np.abs(total - tau) for t, tau in taus.items()
        }
        out[name] = (theta0, total, masks)
    return out


def test_vector_masks_and_rebuilt_experts_equal_numpy(
    experts: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    base, found = experts
    lambdas = {"alpha": 0.2, "beta": 0.4, "gamma": 0.6}
    spec = CompressSpec(method="tall", tall_lambda=lambdas)
    result = compress_tall(found, str(base), str(tmp_path / "c"), spec)
    want = naive(base, found, lambdas)
    stored = load_file(str(tmp_path / "c" / "compressed-00001.safetensors"))
    manifest = read_manifest(str(tmp_path / "c"))
    assert list(manifest["tasks"]) == list(TASKS)
    assert [manifest["tasks"][t]["lambda"] for t in TASKS] == [0.2, 0.4, 0.6]
    assert sum(t.kept for t in result.tensors) == sum(
        int(m.sum()) for _, _, masks in want.values() for m in masks.values()
    )
    for name, (_, total, masks) in want.items():
        assert np.array_equal(stored[name], total)
        for i, task in enumerate(TASKS):
            packed = stored[f"{name}:mask:{i}"]
            assert packed.shape == (math.ceil(total.size / 8),)
            bits = np.unpackbits(packed, bitorder="little")[: total.size].astype(bool)
            assert np.array_equal(bits, masks[task].reshape(-1))
            assert manifest["tensors"][name]["kept"][i] == int(masks[task].sum())
    shares = [np.mean([m[t].mean() for _, _, m in want.values()]) for t in TASKS]
    assert all(0.05 < share < 0.95 for share in shares)  # masks neither empty nor full
    for task in TASKS:
        out = decompress_model(
            str(tmp_path / "c"), None, str(tmp_path / f"{task}-rebuilt"), task=task
        )
        with open_checkpoint(out) as rebuilt, open_checkpoint(found[task]) as original:
            assert rebuilt.names() == original.names()
            for name in original.names():
                got = rebuilt.tensor(name).numpy()
                if name not in want:  # integer buffers: the base's, which every expert holds
                    assert np.array_equal(got, original.tensor(name).numpy())
                    continue
                theta0, total, masks = want[name]
                assert np.array_equal(got, np.where(masks[task], theta0 + total, theta0))


def test_bfloat16_vector_is_stored_in_the_inputs_dtype(tmp_path: Path) -> None:
    base, (e0, e1) = family(tmp_path, n=2)
    found = {"a": str(e0), "b": str(e1)}
    compress_tall(found, str(base), str(tmp_path / "c"))
    name = "model.layers.0.mlp.up_proj.weight"
    with (
        open_checkpoint(str(tmp_path / "c")) as packed,
        open_checkpoint(str(base)) as b,
        open_checkpoint(str(e0)) as a,
        open_checkpoint(str(e1)) as c,
    ):
        theta0 = b.tensor(name).float()
        total = (a.tensor(name).float() - theta0) + (c.tensor(name).float() - theta0)
        assert packed.dtype(name) == torch.bfloat16
        assert torch.equal(packed.tensor(name), total.to(torch.bfloat16))
        out = decompress_model(str(tmp_path / "c"), None, str(tmp_path / "d"), task="a")
        with open_checkpoint(out) as d:
            mask = np.unpackbits(packed.tensor(name + ":mask:0").numpy(), bitorder="little")
            m = torch.from_numpy(mask[: theta0.numel()].astype(bool)).reshape(theta0.shape)
            vector = packed.tensor(name).float()
            want = torch.where(m, theta0 + vector, theta0).to(torch.bfloat16)
            assert d.dtype(name) == torch.bfloat16 and torch.equal(d.tensor(name), want)


def test_sizes_are_exact(experts: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    base, found = experts
    result = compress_tall(
        found, str(base), str(tmp_path / "c"), CompressSpec(method="tall", max_shard_size=900)
    )
    folder = tmp_path / "c"
    on_disk = {
        p.name: p.stat().st_size
        for p in folder.iterdir()
        if p.suffix == ".safetensors" or p.name == "compression.json"
    }
    assert result.files == on_disk and len(on_disk) > 2  # several shards and the manifest
    base_tensors = llama_tensors(0, torch.float32)
    payload = sum(
        4 * t.numel() + len(TASKS) * math.ceil(t.numel() / 8)
        for t in base_tensors.values()
        if t.is_floating_point()
    )
    headers = 0
    for name in on_disk:
        if name.endswith(".safetensors"):
            with (folder / name).open("rb") as fh:
                headers += 8 + int.from_bytes(fh.read(8), "little")
    manifest = on_disk["compression.json"]
    assert result.compressed_bytes == payload + headers + manifest
    entries = sum(1 for t in base_tensors.values() if t.is_floating_point()) * (1 + len(TASKS))
    assert headers < 120 * entries  # a safetensors header line per stored entry
    assert manifest < 2000 + 300 * len(base_tensors)
    assert result.dense_bytes == sum(open_checkpoint(u).nbytes for u in found.values())
    assert sum(t.stored_bytes for t in result.tensors) == payload


def test_bad_inputs_through_the_cli(
    experts: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    base, found = experts
    c, d = str(tmp_path / "c"), str(tmp_path / "d")
    named = [f"{t}={u}" for t, u in found.items()]
    args = ["compress", *named, "--method", "tall", "--base", str(base), "--output", c]
    code, out, _ = run_cli([*args, "--tall-lambda", "0.3", "--json"], monkeypatch, capsys)
    files = [p for p in Path(c).iterdir() if p.suffix == ".safetensors" or p.suffix == ".json"]
    weight_files = [p for p in files if p.name not in ("config.json", "amalgam-commit.json")]
    assert code == 0
    assert json.loads(out)["compressed_bytes"] == sum(p.stat().st_size for p in weight_files)

    code, _, err = run_cli(["decompress", c, "--output", d, "--task", "delta"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and "unknown task 'delta'" in err
    assert "the stored tasks are alpha, beta, gamma" in err

    other = llama_tensors(1, torch.float32)
    odd = write_model(tmp_path / "odd", other)
    code, _, err = run_cli(
        ["decompress", c, "--output", d, "--task", "beta", "--base", str(odd)],
        monkeypatch,
        capsys,
    )
    odd_hash, base_hash = (
        open_checkpoint(str(odd)).content_hash(),
        open_checkpoint(str(base)).content_hash(),
    )
    assert code == 2 and err.count("\n") == 1 and odd_hash in err and base_hash in err
    assert not Path(d).exists()

    code, _, err = run_cli(["decompress", c, "--output", d], monkeypatch, capsys)
    assert code == 2 and "name one with --task" in err
    code, _, err = run_cli([*args, "--tall-lambda", "-1", "--overwrite"], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: --tall-lambda")
    code, _, err = run_cli(
        ["compress", *named, "--output", c, "--base", str(base)], monkeypatch, capsys
    )
    assert code == 2 and "compresses one model; got 3" in err
    code, _, _ = run_cli(["decompress", c, "--output", d, "--task", "beta"], monkeypatch, capsys)
    assert code == 0 and (tmp_path / "d" / "model.safetensors").is_file()
    compeft = str(tmp_path / "compeft")
    code, _, _ = run_cli(
        ["compress", found["alpha"], "--base", str(base), "--output", compeft], monkeypatch, capsys
    )
    assert code == 0
    code, _, err = run_cli(
        ["decompress", compeft, "--output", str(tmp_path / "e"), "--task", "alpha"],
        monkeypatch,
        capsys,
    )
    assert code == 2 and "--task picks an expert of TALL storage; this folder is compeft" in err


def test_an_expert_of_another_shape_is_refused(
    experts: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    base, found = experts
    odd = llama_tensors(3, torch.float32)
    odd["model.embed_tokens.weight"] = torch.zeros(20, 8)
    found["odd"] = str(write_model(tmp_path / "odd", odd))
    with pytest.raises(CompressError, match=r"has shape \[20, 8\]"):
        compress_tall(found, str(base), str(tmp_path / "c"))
    with pytest.raises(CompressError, match=r"tall_lambda: names tasks \['alpha'\]"):
        compress_tall(
            found,
            str(base),
            str(tmp_path / "c"),
            CompressSpec(method="tall", tall_lambda={"alpha": 0.3}),
        )
    assert not (tmp_path / "c").exists()
    del found["odd"]
    broken = llama_tensors(0, torch.float32)
    broken["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    found["nan"] = str(write_model(tmp_path / "nan", broken))
    with pytest.raises(CompressError, match=r"up_proj.weight': NaN or Inf in .+/nan or its base"):
        compress_tall(found, str(base), str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_a_killed_compression_leaves_nothing_and_the_rerun_completes(
    experts: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """SIGKILL at the 6th tensor write (a real process, kill point injected from outside the
    product): the output is absent; the same command again removes the dead run's staging and
    writes the same bytes as an uninterrupted run."""
    base, found = experts
    named = [f"{t}={u}" for t, u in found.items()]

    def command(out: Path) -> list[str]:
        cli = "from amalgam_flows.cli import main; main()"
        compress = ["compress", *named, "--method", "tall", "--base", str(base)]
        return ["-c", cli, *compress, "--output", str(out)]

    home = tmp_path / "home"
    reference = run_process(command(tmp_path / "reference"), process_env(home))
    assert reference.code == 0, reference.tail
    killed = run_process(
        command(tmp_path / "out"), process_env(home, kill="amalgam.writer:ShardWriter.write:6")
    )
    assert killed.code == KILLED, killed.tail
    assert not (tmp_path / "out").exists()
    assert work_folders(str(tmp_path))  # the dead run's staging folder
    again = run_process(command(tmp_path / "out"), process_env(home))
    assert again.code == 0, again.tail
    assert intact(*storage.resolve(str(tmp_path / "out")))
    assert weights(str(tmp_path / "out")) == weights(str(tmp_path / "reference"))
    assert work_folders(str(tmp_path)) == []


@pytest.mark.slow
def test_s3_to_s3_equals_local(s3, tmp_path: Path) -> None:
    import uuid

    bucket = f"tall-{uuid.uuid4().hex[:8]}"
    s3.make_bucket(bucket)
    fs, opts = s3.filesystem(), s3.storage_options()
    upload_family(s3, tmp_path, bucket)
    remote = f"s3://{bucket}"
    spec = CompressSpec(method="tall", max_shard_size=300)
    found = {f"e{i}": f"{remote}/expert{i}" for i in range(3)}
    result = compress_tall(found, f"{remote}/base", f"{remote}/c", spec, **opts)
    stored = {p.rsplit("/", 1)[1]: fs.size(p) for p in fs.ls(f"{bucket}/c", detail=False)}
    assert result.files == {n: size for n, size in stored.items() if n in result.files}
    decompress_model(f"{remote}/c", None, f"{remote}/d", task="e1", **opts)
    local = {f"e{i}": str(tmp_path / f"expert{i}") for i in range(3)}
    compress_tall(local, str(tmp_path / "base"), str(tmp_path / "c"), spec)
    decompress_model(str(tmp_path / "c"), None, str(tmp_path / "d"), task="e1")
    with open_checkpoint(f"{remote}/d", **opts) as a, open_checkpoint(str(tmp_path / "d")) as b:
        assert a.names() == b.names()
        for name in a.names():
            assert torch.equal(a.tensor(name), b.tensor(name))
    assert not [p for p in fs.ls(bucket, detail=False) if ".partial-" in p]
