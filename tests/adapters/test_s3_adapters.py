"""Adapters on a real S3 server (SeaweedFS): the recipe's base and BASE+ADAPTER URIs both open
from the store, and a Ray worker reopens the BASE+ADAPTER URI the plan records. The merge
equals the same merge of the local copies tensor for tensor (the files differ only in the
provenance, which names the URIs)."""

from __future__ import annotations

import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file

from amalgam.adapters import open_input
from amalgam.engine import MergeOptions, run_merge
from amalgam.recipe import parse_recipe
from tests.adapters.builders import adapter, base_model
from tests.helpers import recipe_dict


def test_adapters_from_s3_with_ray_equal_local(s3, tmp_path: Path) -> None:
    base = base_model(tmp_path / "base")
    loras = [adapter(base, tmp_path / f"lora{i}", seed=i + 1) for i in range(2)]
    bucket = s3.make_bucket(f"adapters-{uuid.uuid4().hex[:8]}")
    fs = s3.filesystem()
    for folder in (base, *loras):
        fs.put(str(folder), f"{bucket}/{folder.name}", recursive=True)
    remote = {p.name: f"s3://{bucket}/{p.name}" for p in (base, *loras)}
    data = {
        "method": "ties",
        "base": remote["base"],
        "models": [{"uri": remote["lora0"]}, {"uri": f"{remote['base']}+{remote['lora1']}"}],
        "output": str(tmp_path / "from-s3"),
        "max_shard_size": 20_000,
        "storage_options": s3.storage_options(),
    }
    run_merge(parse_recipe(data), MergeOptions(executor="ray", threads=1))
    local = recipe_dict(base, loras, "ties", tmp_path / "local", max_shard_size=20_000)
    run_merge(parse_recipe(local), MergeOptions(threads=1))

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        files = sorted(folder.glob("*.safetensors"))
        return {k: v for f in files for k, v in load_file(str(f)).items()}

    assert len(list((tmp_path / "local").glob("*.safetensors"))) > 1  # several Ray tasks
    got, want = tensors(tmp_path / "from-s3"), tensors(tmp_path / "local")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


HTTP_OVERHEAD = 32 << 10  # request and response headers of a few ranged GETs


def test_one_tensor_transfers_only_its_module(s3, s3_counted, tmp_path: Path) -> None:
    """Reading one patched tensor downloads the base tensor and that module's A and B, never
    the whole base or adapter: memory and traffic stay bounded by one module."""
    base = base_model(tmp_path / "base", hidden_size=128, intermediate_size=256, vocab_size=512)
    lora = adapter(base, tmp_path / "lora", seed=1, r=8)
    bucket = s3.make_bucket(f"adapter-reads-{uuid.uuid4().hex[:8]}")
    for folder in (base, lora):
        s3.filesystem().put(str(folder), f"{bucket}/{folder.name}", recursive=True)
    uri = f"s3://{bucket}/base+s3://{bucket}/lora"
    proxy = s3_counted.proxy
    name = "model.layers.1.self_attn.q_proj.weight"
    with open_input(uri, **s3_counted.storage_options) as ckpt:
        patch = ckpt.layout.patches[name]
        parts = (ckpt.adapter.info(patch.a), ckpt.adapter.info(patch.b))
        needed = ckpt.info(name).nbytes + sum(p.nbytes for p in parts)
        proxy.reset()
        got = ckpt.tensor(name)
        received = proxy.received
    with open_input(str(lora), base=str(base)) as local:
        assert torch.equal(got, local.tensor(name))
    whole = (base / "model.safetensors").stat().st_size
    assert needed <= received < needed + HTTP_OVERHEAD, (received, needed)
    assert received * 10 < whole, (received, whole)
