"""S3 faults mid-read and mid-write of a merge: a real SeaweedFS behind the fault proxy, the
real `amalgam merge` command. A fault within the retry budget is retried and the output is
byte-identical to a fault-free merge; past the budget the merge ends in one ``error:`` line and
exit 2, leaving no commit record at the output and no staging folder; after a failed write,
running the same command again without faults ends with the complete output."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator

import pytest
import yaml

from amalgam.checkpoint import COMMIT_RECORD, open_checkpoint
from amalgam.discover import discover_checkpoints
from amalgam.engine import MergeOptions, run_merge
from amalgam.errors import CheckpointError
from amalgam.recipe import parse_recipe
from amalgam.writer import intact
from tests.faults.s3_fault_proxy import FaultProxy, Rule, fault_proxy_for
from tests.helpers import run_cli, upload_family

pytestmark = pytest.mark.slow

READ = r"/expert1/model\.safetensors$"  # one input's tensor reads (after its header read)
# GETs of READ that pass before a read fault fires: its header, then the first tensor (read
# exactly), so the fault hits the request that reads ahead for the tensors after it
SKIP = 2
STAGE = r"/\.out\.partial-[^/]*/model\.safetensors$"  # a shard staged by a Ray worker
PART = r"/out/model\.safetensors\?.*partNumber="  # the shard's parts, uploaded to its final key
COMPLETE = r"/out/model\.safetensors\?uploadId="  # the commit completing the shard's upload
RECORD = r"/out/amalgam-commit\.json$"  # the commit record, written last
ALWAYS = 10_000

RETRIED = {
    "read 500 InternalError": Rule("status", READ, "GET", skip=SKIP, status=500),
    "read 503 SlowDown twice": Rule("status", READ, "GET", skip=SKIP, times=2, status=503),
    "read reset before the request": Rule("reset-request", READ, "GET", skip=SKIP),
    "read reset mid-body": Rule("reset-response", READ, "GET", skip=SKIP),
    "read body truncated": Rule("truncate", READ, "GET", skip=SKIP),
    "read short body": Rule("short", READ, "GET", skip=SKIP),
    "read slower than the read timeout": Rule("delay", READ, "GET", skip=SKIP, seconds=2.5),
    "write 503 SlowDown": Rule("status", PART, "PUT", status=503),
    "write reset mid-request": Rule("reset-request", PART, "PUT"),
    "write slow (0.3 s)": Rule("delay", PART, "PUT", seconds=0.3),
    "commit completion reset": Rule("reset-request", COMPLETE, "POST"),
    "commit record reset": Rule("reset-request", RECORD, "PUT"),
}

FAILED = {
    "read 500 every time": (Rule("status", READ, "GET", skip=SKIP, times=ALWAYS, status=500), READ),
    "read truncated every time": (Rule("truncate", READ, "GET", skip=SKIP, times=ALWAYS), READ),
    "read short every time": (Rule("short", READ, "GET", skip=SKIP, times=ALWAYS), READ),
    "write reset every time": (Rule("reset-request", PART, "PUT", times=ALWAYS), PART),
    "commit completion 500 every time": (
        Rule("status", COMPLETE, "POST", times=ALWAYS, status=500),
        COMPLETE,
    ),
    "commit record reset every time": (Rule("reset-request", RECORD, "PUT", times=ALWAYS), RECORD),
}


@pytest.fixture(scope="module")
def proxy(s3) -> Iterator[FaultProxy]:
    with fault_proxy_for(s3.endpoint_url) as started:
        yield started


@pytest.fixture
def fault_proxy(proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The module's proxy, no rules and an empty log."""
    proxy.reset()
    yield proxy
    proxy.reset()


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory) -> str:
    """A bucket holding a base and three experts (uploaded directly, not through the proxy)."""
    name = s3.make_bucket(f"faults-{uuid.uuid4().hex[:8]}")
    upload_family(s3, tmp_path_factory.mktemp("family"), name)
    return name


def file_hashes(s3, path: str) -> dict[str, str]:
    """sha256 of every file in the folder at ``path`` (read directly, not through the proxy)."""
    fs = s3.filesystem(skip_instance_cache=True)
    return {
        p.rsplit("/", 1)[1]: hashlib.sha256(fs.cat_file(p)).hexdigest()
        for p in fs.ls(path, detail=False)
    }


def recipe(s3, proxy: FaultProxy, bucket: str, out: str, read_timeout: float = 60) -> dict:
    """A TIES merge from ``bucket`` into its folder ``out`` through the fault proxy, with a
    small retry budget (2 attempts per request in botocore; s3fs's own 5 around them)."""
    options = s3.storage_options(
        proxy.url,
        skip_instance_cache=True,
        config_kwargs={
            "retries": {"max_attempts": 2, "mode": "standard"},
            "read_timeout": read_timeout,
        },
    )
    return {
        "method": "ties",
        "base": f"s3://{bucket}/base",
        "models": [{"uri": f"s3://{bucket}/expert{i}"} for i in range(3)],
        "output": f"s3://{bucket}/{out}",
        "storage_options": options,
    }


def merge(s3, proxy, bucket, out, tmp_path, monkeypatch, capsys, read_timeout=60):
    """`amalgam merge` of :func:`recipe`: (exit code, stdout, stderr)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(s3, proxy, bucket, out, read_timeout)))
    return run_cli(["merge", str(path)], monkeypatch, capsys)


@pytest.fixture(scope="module")
def reference(s3, bucket, proxy) -> dict[str, str]:
    """sha256 of every file of a fault-free merge of the recipe."""
    proxy.reset()
    run_merge(parse_recipe(recipe(s3, proxy, bucket, "reference/out")))
    hashes = file_hashes(s3, f"{bucket}/reference/out")
    assert {"model.safetensors", "config.json", COMMIT_RECORD} <= set(hashes)
    return hashes


def no_staging(s3, folder: str) -> bool:
    """No staging folder under ``folder``, and no multipart upload left open there."""
    fs = s3.filesystem(skip_instance_cache=True)
    bucket, prefix = folder.split("/", 1)
    listed = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    if [u for u in listed if u["Key"].startswith(prefix + "/")]:
        return False
    return not fs.exists(folder) or not [p for p in fs.ls(folder) if ".partial-" in p]


@pytest.mark.parametrize("case", list(RETRIED))
def test_fault_retried_output_identical(
    case, s3, bucket, reference, fault_proxy: FaultProxy, tmp_path, monkeypatch, capsys
) -> None:
    rule = RETRIED[case]
    fault_proxy.reset(rule)
    case_dir = f"{bucket}/{uuid.uuid4().hex[:8]}"
    out = f"{case_dir.split('/', 1)[1]}/out"
    timeout = 1 if "timeout" in case else 60
    code, _, err = merge(s3, fault_proxy, bucket, out, tmp_path, monkeypatch, capsys, timeout)
    assert code == 0, err
    assert rule.fired == rule.times, f"{case}: the fault never happened"
    assert file_hashes(s3, f"{bucket}/{out}") == reference
    assert intact(s3.filesystem(skip_instance_cache=True), f"{bucket}/{out}")
    assert no_staging(s3, case_dir)


@pytest.mark.parametrize("case", list(FAILED))
def test_fault_past_the_retry_budget_fails_cleanly(
    case, s3, bucket, reference, fault_proxy: FaultProxy, tmp_path, monkeypatch, capsys
) -> None:
    rule, where = FAILED[case]
    fault_proxy.reset(rule)
    case_dir = f"{bucket}/{uuid.uuid4().hex[:8]}"
    out = f"{case_dir.split('/', 1)[1]}/out"
    code, _, err = merge(s3, fault_proxy, bucket, out, tmp_path, monkeypatch, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert rule.fired > 2, f"{case}: fewer attempts than the retry budget"
    assert ("expert1/model.safetensors" if where == READ else case_dir) in lines[0]
    fresh = s3.storage_options(skip_instance_cache=True)
    fs = s3.filesystem(skip_instance_cache=True)
    assert not fs.exists(f"{bucket}/{out}/{COMMIT_RECORD}")
    assert no_staging(s3, case_dir)
    if fs.exists(f"{bucket}/{out}"):  # a commit that failed midway: unfinished, refused
        with pytest.raises(CheckpointError, match="unfinished amalgam output"):
            open_checkpoint(f"s3://{bucket}/{out}", **fresh)
    assert discover_checkpoints(f"s3://{case_dir}", **fresh) == []
    if where == READ:
        return
    fault_proxy.reset()  # the same command again, the store healthy: complete and identical
    code, _, err = merge(s3, fault_proxy, bucket, out, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert file_hashes(s3, f"{bucket}/{out}") == reference
    assert no_staging(s3, case_dir)


def test_faults_on_ray_workers_retried(s3, bucket, reference, fault_proxy: FaultProxy) -> None:
    """The same faults where Ray workers read the inputs and write the shards: a body cut
    short mid-read and a SlowDown on the staged shard are retried, and the output is
    byte-identical to the local executor's fault-free merge."""
    read = Rule("reset-response", READ, "GET", skip=SKIP)
    write = Rule("status", STAGE, "PUT", status=503)
    fault_proxy.reset(read, write)
    case_dir = f"{bucket}/{uuid.uuid4().hex[:8]}"
    out = f"{case_dir.split('/', 1)[1]}/out"
    run_merge(parse_recipe(recipe(s3, fault_proxy, bucket, out)), MergeOptions(executor="ray"))
    assert read.fired == 1 and write.fired == 1
    assert file_hashes(s3, f"{bucket}/{out}") == reference
    assert no_staging(s3, case_dir)
