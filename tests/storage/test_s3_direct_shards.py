"""S3 outputs whose shards upload straight to their final keys (multipart uploads completed by
the commit), on the real SeaweedFS server: bytes identical to a local merge, nothing visible
before the commit, and a writer killed mid-upload leaves nothing that looks complete."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from amalgam import uploads
from amalgam.checkpoint import COMMIT_RECORD
from amalgam.engine import MergeOptions, run_merge
from amalgam.recipe import parse_recipe
from amalgam.writer import UPLOAD, CheckpointWriter, intact
from tests.helpers import write_model

pytestmark = pytest.mark.slow
PART = 5 << 20  # S3's smallest part: shards of a few parts, cut inside tensors


def models(root: Path) -> list[Path]:
    """A base and two experts of ~13 MiB each (bf16), tensors larger and smaller than a part."""
    g = torch.Generator().manual_seed(7)
    base = {"model.embed_tokens.weight": torch.randn(3000, 1024, generator=g)}
    for i in range(2):
        base[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(1000, 1024, generator=g)
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(1024, generator=g)
    base["model.norm.weight"] = torch.randn(1, generator=g)[0]  # a scalar
    out = [write_model(root / "base", {k: v.bfloat16() for k, v in base.items()})]
    for e in range(2):
        t = {k: (v + 0.1 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
        out.append(write_model(root / f"expert{e}", t))
    return out


@pytest.fixture(scope="module")
def family(s3, tmp_path_factory) -> tuple[list[Path], str]:
    """The models locally, and the bucket prefix holding the same files."""
    folders = models(tmp_path_factory.mktemp("direct"))
    prefix = f"{s3.make_bucket(f'direct-{uuid.uuid4().hex[:8]}')}/inputs"
    fs = s3.filesystem()
    for f in folders:
        fs.put(str(f), f"{prefix}/{f.name}", recursive=True)
    return folders, prefix


def recipe(inputs: list[str], output: str, options: dict) -> dict:
    return {
        "method": "ties",
        "base": inputs[0],
        "models": [{"uri": u} for u in inputs[1:]],
        "output": output,
        "max_shard_size": 9 << 20,  # two shards and an index
        "storage_options": options,
    }


def split(shard: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header without its metadata, and its tensor bytes."""
    n = int.from_bytes(shard[:8], "little")
    header = json.loads(shard[8 : 8 + n])
    header.pop("__metadata__", None)
    return header, shard[8 + n :]


def open_uploads(s3, prefix: str) -> list[str]:
    bucket, key = prefix.split("/", 1)
    fs = s3.filesystem(skip_instance_cache=True)
    listed = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    return [u["Key"] for u in listed if u["Key"].startswith(key + "/")]


def test_s3_to_s3_bytes_identical_to_local(s3, family, tmp_path, monkeypatch) -> None:
    folders, prefix = family
    monkeypatch.setattr(uploads, "PART_BYTES", PART)
    parts: list[int] = []
    upload_part = uploads.ParallelUpload._upload_part

    def counted(self, number, body):
        parts.append(len(body))
        return upload_part(self, number, body)

    monkeypatch.setattr(uploads.ParallelUpload, "_upload_part", counted)
    local = tmp_path / "out"
    run_merge(parse_recipe(recipe([str(f) for f in folders], str(local), {})))
    out = f"{prefix.split('/')[0]}/merged-{uuid.uuid4().hex[:6]}"
    options = s3.storage_options(skip_instance_cache=True)
    inputs = [f"s3://{prefix}/{f.name}" for f in folders]
    run_merge(parse_recipe(recipe(inputs, f"s3://{out}", options)), MergeOptions(overwrite=True))
    fs = s3.filesystem(skip_instance_cache=True)
    got = {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in fs.ls(out, detail=False)}
    want = {p.name: p.read_bytes() for p in local.iterdir()}
    assert {"model-00001-of-00002.safetensors", COMMIT_RECORD} <= set(want)
    assert set(got) == set(want)
    record = json.loads(got[COMMIT_RECORD])["files"]
    for name, data in got.items():  # each file as the commit recorded it (hashed on the way)
        if name != COMMIT_RECORD:
            assert record[name]["sha256"] == hashlib.sha256(data).hexdigest(), name
    assert got["config.json"] == want["config.json"]
    for name in (n for n in want if n.endswith(".safetensors")):
        # the same header but for the metadata (the recipe names other inputs) and the same
        # tensor bytes
        (g_head, g_data), (w_head, w_data) = split(got[name]), split(want[name])
        assert g_head == w_head and g_data == w_data, name
    # every shard was multipart, each part exactly PART bytes but a shard's last
    shard_bytes = sorted(len(d) for n, d in want.items() if n.endswith(".safetensors"))
    assert len(parts) == sum(-(-n // PART) for n in shard_bytes) and max(parts) == PART
    assert open_uploads(s3, out) == []
    assert not [p for p in fs.ls(prefix.split("/")[0], detail=False) if ".partial-" in p]


def test_nothing_visible_before_commit_and_abort_keeps_old_output(s3, family) -> None:
    folders, prefix = family
    bucket = prefix.split("/")[0]
    out = f"s3://{bucket}/kept-{uuid.uuid4().hex[:6]}"
    options = s3.storage_options(skip_instance_cache=True)
    inputs = [f"s3://{prefix}/{f.name}" for f in folders]
    run_merge(parse_recipe(recipe(inputs[:2], out, options)))  # the old output
    fs = s3.filesystem(skip_instance_cache=True)
    old = {p: fs.cat_file(p) for p in fs.ls(out, detail=False)}
    writer = CheckpointWriter(out, overwrite=True, **options)
    shard = writer.shard("model-00001-of-00002.safetensors", [("x", "BF16", (4 << 20,))], {})
    shard.write("x", torch.ones(4 << 20, dtype=torch.bfloat16))
    shard.close()  # every byte stored, nothing in place
    assert len(open_uploads(s3, out[5:])) == 1
    fs.invalidate_cache()
    assert {p: fs.cat_file(p) for p in fs.ls(out, detail=False)} == old
    assert intact(fs, out[5:])
    writer.abort()
    fs.invalidate_cache()
    assert {p: fs.cat_file(p) for p in fs.ls(out, detail=False)} == old
    assert open_uploads(s3, out[5:]) == [] and intact(fs, out[5:])


KILLED = """
import json, os, signal, sys, torch
from amalgam.writer import CheckpointWriter
out, options = sys.argv[1], json.loads(sys.argv[2])
writer = CheckpointWriter(out, **options)
shard = writer.shard("model.safetensors", [("x", "BF16", (6 << 20,))], {})
shard.write("x", torch.ones(6 << 20, dtype=torch.bfloat16))
shard.close()
os.kill(os.getpid(), signal.SIGKILL)  # killed before the commit
"""


def test_writer_killed_mid_upload_leaves_nothing_and_next_writer_aborts_it(s3, family) -> None:
    bucket = family[1].split("/")[0]
    out = f"s3://{bucket}/killed-{uuid.uuid4().hex[:6]}"
    options = s3.storage_options(skip_instance_cache=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", KILLED, out, json.dumps(options)], env=env)
    assert run.returncode == -signal.SIGKILL
    fs = s3.filesystem(skip_instance_cache=True)
    assert not fs.exists(out)  # no output, not even an unfinished one
    assert len(open_uploads(s3, out[5:])) == 1  # the shard's stored parts, invisible
    staged = [p for p in fs.ls(bucket, detail=False) if f".{out.rsplit('/', 1)[1]}.partial-" in p]
    assert len(staged) == 1 and fs.find(staged[0])[0].endswith(UPLOAD)
    writer = CheckpointWriter(out, **options)  # the next writer of the output cleans up
    assert open_uploads(s3, out[5:]) == []
    fs.invalidate_cache()
    assert staged[0] not in fs.ls(bucket, detail=False)  # its staging folder removed too
    writer.abort()
