"""Merging from and to a real S3 server: local and Ray executors, staged commit, no leftovers."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amalgam.checkpoint import open_checkpoint
from amalgam.engine import MergeOptions, run_merge
from amalgam.errors import MergeError
from amalgam.recipe import parse_recipe
from amalgam.writer import COMMIT_RECORD, INDEX_NAME, intact
from tests.helpers import family


def upload(s3, local: Path, bucket: str) -> str:
    fs = s3.filesystem()
    uri = f"{bucket}/{local.name}"
    fs.put(str(local), uri, recursive=True)
    return f"s3://{uri}"


@pytest.fixture
def remote_family(s3, tmp_path: Path) -> tuple[str, list[str], Path]:
    bucket = f"merge-{uuid.uuid4().hex[:8]}"
    s3.make_bucket(bucket)
    base, experts = family(tmp_path / "in")
    return upload(s3, base, bucket), [upload(s3, e, bucket) for e in experts], base


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_merge_s3_to_s3_equals_local(s3, remote_family, tmp_path, executor) -> None:
    base_uri, expert_uris, base_dir = remote_family
    opts = s3.storage_options()
    common = {"method": "ties", "max_shard_size": 700, "storage_options": opts}
    out_uri = f"{base_uri.rsplit('/', 1)[0]}/merged-{executor}"
    remote = parse_recipe(
        {**common, "base": base_uri, "models": [{"uri": u} for u in expert_uris], "output": out_uri}
    )
    run_merge(remote, MergeOptions(executor=executor, device="cpu"))
    local_dir = base_dir.parent
    local = parse_recipe(
        {
            "method": "ties",
            "max_shard_size": 700,
            "base": str(local_dir / "base"),
            "models": [{"uri": str(local_dir / f"expert{i}")} for i in range(3)],
            "output": str(tmp_path / "local"),
        }
    )
    run_merge(local)
    merged = open_checkpoint(out_uri, **opts)
    assert len(merged.files) > 1  # sharded, with an index
    for name in merged.names():
        assert torch.equal(
            merged.tensor(name), open_checkpoint(str(tmp_path / "local")).tensor(name)
        )
    fs = s3.filesystem()
    bucket = out_uri.removeprefix("s3://").split("/")[0]
    assert not [p for p in fs.ls(bucket) if ".partial-" in p]


def test_failed_s3_merge_leaves_nothing(s3, remote_family, tmp_path) -> None:
    base_uri, expert_uris, base_dir = remote_family
    tensors = load_file(str(base_dir.parent / "expert1" / "model.safetensors"))
    tensors["model.norm.weight"][0] = float("inf")
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"))
    bucket = base_uri.removeprefix("s3://").split("/")[0]
    bad_uri = upload(s3, bad, bucket)
    out_uri = f"s3://{bucket}/never"
    recipe = parse_recipe(
        {
            "method": "task_arithmetic",
            "base": base_uri,
            "models": [{"uri": expert_uris[0]}, {"uri": bad_uri}],
            "output": out_uri,
            "storage_options": s3.storage_options(),
        }
    )
    with pytest.raises(MergeError, match=r"model\.norm\.weight"):
        run_merge(recipe)
    fs = s3.filesystem()
    assert not fs.exists(out_uri)
    assert not [p for p in fs.ls(bucket) if ".partial-" in p or p.endswith("never")]


def test_cli_inspect_over_s3(s3, remote_family, monkeypatch, capsys) -> None:
    import json
    import sys

    from amalgam_flows.cli import main

    base_uri, _, base_dir = remote_family
    options = json.dumps(s3.storage_options())
    monkeypatch.setattr(
        sys, "argv", ["amalgam", "inspect", base_uri, "--json", "--storage-options", options]
    )
    main()
    report = json.loads(capsys.readouterr().out)
    local = open_checkpoint(str(base_dir))
    assert report["uri"] == base_uri
    assert report["parameters"] == local.num_params
    assert report["content_hash"] == local.content_hash()


def test_overwrite_on_s3_leaves_exactly_the_new_output(s3, remote_family) -> None:
    """A sharded output replaced by a single-file merge: the old shards and index are gone,
    the commit record (written last) lists exactly the new files, and the output is intact."""
    base_uri, expert_uris, _ = remote_family
    opts = s3.storage_options()
    out_uri = f"{base_uri.rsplit('/', 1)[0]}/replaced"
    data = {"base": base_uri, "models": [{"uri": u} for u in expert_uris], "output": out_uri}
    common = {"storage_options": opts, **data}
    run_merge(parse_recipe({**common, "method": "ties", "max_shard_size": 700}))
    fs = s3.filesystem()
    path = out_uri.removeprefix("s3://")
    assert INDEX_NAME in {p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False)}
    run_merge(parse_recipe({**common, "method": "task_arithmetic"}), MergeOptions(overwrite=True))
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False)}
    record = json.loads(fs.cat_file(f"{path}/{COMMIT_RECORD}"))
    assert names == {*record["files"], COMMIT_RECORD}
    assert "model.safetensors" in names and INDEX_NAME not in names
    assert intact(fs, path)
    assert open_checkpoint(out_uri, **opts).metadata["model.safetensors"]["method"] == (
        "task_arithmetic"
    )
