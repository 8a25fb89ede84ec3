"""Commits on a real S3 server (SeaweedFS): readers require the commit record of a folder
amalgam wrote, and an ``--overwrite`` commit stopped at any step never leaves a folder that
reads as finished, and the next commit of the output completes it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from amalgam.checkpoint import COMMIT_RECORD, open_checkpoint
from amalgam.discover import discover_checkpoints
from amalgam.engine import MergeOptions, run_merge
from amalgam.errors import CheckpointError, OutputError
from amalgam.recipe import parse_recipe
from amalgam.writer import INDEX_NAME, CheckpointWriter, intact
from tests.faults.s3_fault_proxy import FaultProxy, Rule, fault_proxy_for
from tests.helpers import run_cli, upload_family

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proxy(s3) -> Iterator[FaultProxy]:
    with fault_proxy_for(s3.endpoint_url) as started:
        yield started


@pytest.fixture(scope="module")
def folder(s3, tmp_path_factory) -> str:
    """A bucket whose ``inputs/`` hold a base and three experts as a training job wrote them."""
    bucket = s3.make_bucket(f"commit-{uuid.uuid4().hex[:8]}")
    upload_family(s3, tmp_path_factory.mktemp("family"), f"{bucket}/inputs")
    return bucket


def store_options(s3, endpoint: str | None = None) -> dict:
    """Options for the server, or for the proxy at ``endpoint``: a small retry budget (one
    attempt per request in botocore, s3fs's own 5 around it)."""
    return s3.storage_options(
        endpoint,
        skip_instance_cache=True,
        config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"}},
    )


def merge_recipe(s3, bucket: str, out: str, method: str, endpoint: str | None = None, **extra):
    return parse_recipe(
        {
            "method": method,
            "base": f"s3://{bucket}/inputs/base",
            "models": [{"uri": f"s3://{bucket}/inputs/expert{i}"} for i in range(3)],
            "output": f"s3://{bucket}/{out}",
            "storage_options": store_options(s3, endpoint),
            **extra,
        }
    )


def names(fs, path: str) -> set[str]:
    fs.invalidate_cache(path)
    return {p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False)}


def copy_without_record(fs, src: str, dst: str, only: set[str] | None = None) -> None:
    """What a commit stopped between files leaves: some or all files, no record."""
    for name in sorted(names(fs, src) - {COMMIT_RECORD}):
        if only is None or name in only:
            fs.copy(f"{src}/{name}", f"{dst}/{name}")


def test_unfinished_commit_refused_and_not_discovered(
    s3, folder, tmp_path, monkeypatch, capsys
) -> None:
    opts = s3.storage_options(skip_instance_cache=True)
    fs = s3.filesystem(skip_instance_cache=True)
    run_merge(merge_recipe(s3, folder, "models/single", "task_arithmetic"))
    run_merge(merge_recipe(s3, folder, "models/sharded", "ties", max_shard_size=700))
    assert INDEX_NAME in names(fs, f"{folder}/models/sharded")
    # stopped after every file but the record, and after the first weight file only
    copy_without_record(fs, f"{folder}/models/single", f"{folder}/models/single-unrecorded")
    copy_without_record(fs, f"{folder}/models/sharded", f"{folder}/models/sharded-unrecorded")
    copy_without_record(
        fs,
        f"{folder}/models/single",
        f"{folder}/models/weights-only",
        only={"model.safetensors"},
    )
    # a training job's folder (no amalgam marks, no record) is read as before
    copy_without_record(fs, f"{folder}/inputs/expert0", f"{folder}/models/trained")

    for unfinished in ("single-unrecorded", "sharded-unrecorded", "weights-only"):
        uri = f"s3://{folder}/models/{unfinished}"
        with pytest.raises(CheckpointError, match="unfinished amalgam output") as info:
            open_checkpoint(uri, **opts)
        assert str(info.value).startswith(f"{uri}: ")
        assert not intact(fs, f"{folder}/models/{unfinished}")
    code, _, err = run_cli(
        ["inspect", uri, "--storage-options", json.dumps(s3.storage_options())],
        monkeypatch,
        capsys,
    )
    assert code == 2 and err.startswith(f"error: {uri}: unfinished amalgam output")
    assert len(err.strip().splitlines()) == 1
    found = [name for name, _ in discover_checkpoints(f"s3://{folder}/models", **opts)]
    assert found == ["sharded", "single", "trained"]
    assert open_checkpoint(f"s3://{folder}/models/trained", **opts).names()
    # on a local disk the commit is a rename: a folder without its record is read as before
    local = tmp_path / "local-copy"
    fs.get(f"{folder}/models/single-unrecorded", str(local), recursive=True)
    assert COMMIT_RECORD not in {p.name for p in local.iterdir()}
    assert open_checkpoint(str(local)).names()


def test_overwrite_keeps_old_output_until_new_files_are_staged(s3, folder, proxy) -> None:
    fs = s3.filesystem(skip_instance_cache=True)
    run_merge(merge_recipe(s3, folder, "kept/out", "ties", max_shard_size=700))
    before = fs.cat_file(f"{folder}/kept/out/{COMMIT_RECORD}")
    proxy.reset(Rule("reset-request", r"/kept/\.out\.partial-", "PUT", times=10_000))
    new = merge_recipe(s3, folder, "kept/out", "task_arithmetic", proxy.url)
    with pytest.raises(OutputError, match="cannot write"):
        run_merge(new, MergeOptions(overwrite=True))
    proxy.reset()
    assert intact(fs, f"{folder}/kept/out")
    assert fs.cat_file(f"{folder}/kept/out/{COMMIT_RECORD}") == before
    ckpt = open_checkpoint(f"s3://{folder}/kept/out", **s3.storage_options())
    assert {meta["method"] for meta in ckpt.metadata.values()} == {"ties"}
    assert not [p for p in fs.ls(f"{folder}/kept") if ".partial-" in p]


@pytest.fixture(scope="module")
def outputs(s3, folder) -> dict[str, str]:
    """An old sharded output (ties) and the new single-file one (task_arithmetic) that will
    replace it, kept aside as pristine copies."""
    run_merge(merge_recipe(s3, folder, "pristine/old", "ties", max_shard_size=700))
    run_merge(merge_recipe(s3, folder, "pristine/new", "task_arithmetic"))
    return {which: f"{folder}/pristine/{which}" for which in ("old", "new")}


def commit_new(s3, fs, new: str, out: str, endpoint: str | None) -> None:
    """Stage the new output's files and commit them over ``out`` (overwrite) through
    ``endpoint``; the writer's own abort on failure, as the merge engine does it."""
    writer = CheckpointWriter(f"s3://{out}", overwrite=True, **store_options(s3, endpoint))
    try:
        for name in sorted(names(fs, new) - {COMMIT_RECORD}):
            writer.copy_in(fs, f"{new}/{name}", name)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def restore(fs, src: str, dst: str) -> None:
    if fs.exists(dst):
        fs.rm(dst, recursive=True)
    for name in names(fs, src):
        fs.copy(f"{src}/{name}", f"{dst}/{name}")
    fs.invalidate_cache()


def test_overwrite_stopped_at_every_commit_step(s3, folder, outputs, proxy) -> None:
    """The commit's requests to the output (record removal, copies, stale removals, the new
    record) are failed from step k on, for every k: the folder is the old output, whole, or
    reads as unfinished; the next commit of the output completes the new one."""
    fs = s3.filesystem(skip_instance_cache=True)
    old, new, out = outputs["old"], outputs["new"], f"{folder}/stepwise/out"
    old_files, new_files = names(fs, old), names(fs, new)
    opts = s3.storage_options(skip_instance_cache=True)
    restore(fs, old, out)
    proxy.reset()
    commit_new(s3, fs, new, out, proxy.url)
    steps = [t for m, t, _ in proxy.log if m in ("PUT", "DELETE") and "/stepwise/out/" in t]
    assert len(steps) == 1 + len(new_files - {COMMIT_RECORD}) + len(old_files - new_files) + 1
    for k in range(len(steps)):
        restore(fs, old, out)
        rule = Rule("reset-request", r"/stepwise/out/", "PUT|DELETE", skip=k, times=10_000)
        proxy.reset(rule)
        with pytest.raises(OutputError, match=f"s3://{out}: cannot write"):
            commit_new(s3, fs, new, out, proxy.url)
        proxy.reset()
        assert rule.fired >= 1
        if k == 0:  # the old record could not be removed: the old output, whole
            assert names(fs, out) == old_files and intact(fs, out)
        else:
            assert COMMIT_RECORD not in names(fs, out)
            assert not intact(fs, out)
            with pytest.raises(CheckpointError, match="unfinished amalgam output"):
                open_checkpoint(f"s3://{out}", **opts)
            found = discover_checkpoints(f"s3://{folder}/stepwise", **opts)
            assert found == []
        assert not [p for p in fs.ls(f"{folder}/stepwise") if ".partial-" in p]
        commit_new(s3, fs, new, out, None)  # the next run of the same commit
        assert names(fs, out) == new_files and intact(fs, out)
        assert {n: fs.cat_file(f"{out}/{n}") for n in new_files} == {
            n: fs.cat_file(f"{new}/{n}") for n in new_files
        }


def test_rerun_without_overwrite_replaces_an_unfinished_commit(s3, folder, outputs) -> None:
    """A merge killed mid-commit left shards without a record: running the same merge again,
    without --overwrite, completes it; a finished output still needs --overwrite."""
    fs = s3.filesystem(skip_instance_cache=True)
    out = f"{folder}/rerun/out"
    copy_without_record(fs, outputs["new"], out, only={"model.safetensors"})
    recipe = merge_recipe(s3, folder, "rerun/out", "task_arithmetic")
    run_merge(recipe)
    assert intact(fs, out)
    assert fs.cat_file(f"{out}/model.safetensors") == fs.cat_file(
        f"{outputs['new']}/model.safetensors"
    )
    with pytest.raises(OutputError, match="output exists"):
        run_merge(recipe)
