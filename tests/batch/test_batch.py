"""``amalgam batch``: recipes of the tiny zoo run as tasks on a real local Ray, the summary in a
real MLflow SQLite store. A recipe that fails (a missing input, a file that does not parse)
leaves the others to finish with the bytes of a plain merge; a re-run skips what is done; at
most ``concurrency`` recipes run at once; a worker killed mid-merge has its recipe run again."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from zoo.conftest import zoo_tiny

from amalgam import storage
from amalgam.batch import ItemResult, connect, local_output_error, run_batch, run_recipe_item
from amalgam.checkpoint import COMMIT_RECORD, open_checkpoint
from amalgam.engine import MergeOptions, run_merge
from amalgam.errors import AmalgamError
from amalgam.recipe import load_recipe, parse_recipe
from amalgam.registry import BATCH_TAG, CONTENT_TAG, FAILURE_TAG, PARENT_TAG, Registry
from amalgam.transient import is_transient
from amalgam.writer import intact
from tests.faults.kills import Place, process_env, recipe, run_process, weights, write_recipe
from tests.faults.s3_fault_proxy import Rule, fault_proxy_for
from tests.helpers import upload_family

__all__ = ["zoo_tiny"]

#: The third tensor a merge writes (inside its first shard of seven tensors).
KILL = "amalgam.writer:ShardWriter.write:3"
RECORD = r"/out/amalgam-commit\.json$"  # the commit record of an output called ``out``
ALWAYS = 10_000


@pytest.fixture(scope="module")
def ray_up() -> str:
    """The one Ray of this module (the engine's start: loopback, files under $AMALGAM_HOME);
    its address."""
    import ray

    connect(None)
    return ray.get_runtime_context().gcs_address


def good_recipes(zoo, folder: Path, lambdas: list[float]) -> list[Path]:
    return [
        write_recipe(folder, recipe(zoo, Place(str(folder / f"out-{lam}"), {}), lam))
        for lam in lambdas
    ]


def missing_input(zoo, folder: Path) -> Path:
    body = recipe(zoo, Place(str(folder / "out-missing"), {}))
    body["models"][0]["uri"] = str(folder / "no-such-model")
    return write_recipe(folder, body)


def plain_merge(path: Path, out: Path) -> dict[str, str]:
    """sha256 of the weight files of ``amalgam merge`` of the recipe at ``path``."""
    run_merge(load_recipe(path), MergeOptions(output=str(out), executor="local"))
    return weights(str(out))


def max_overlap(items: list[ItemResult]) -> int:
    """The most recipes that ran at the same moment (by their start and end times)."""
    events = sorted([(r.started, 1) for r in items] + [(r.ended, -1) for r in items])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


@pytest.mark.slow
def test_a_batch_finishes_good_recipes_reports_bad_ones_and_skips_on_rerun(
    zoo_tiny, tmp_path: Path, ray_up: str
) -> None:
    good = good_recipes(zoo_tiny, tmp_path, [0.3, 0.5, 0.7])
    bad_yaml = tmp_path / "broken.yaml"
    bad_yaml.write_text("method: [task_arithmetic\n")
    paths = [good[0], missing_input(zoo_tiny, tmp_path), good[1], bad_yaml, good[2]]
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"

    result = run_batch(paths, concurrency=1, retries=1, tracking_uri=tracking)

    assert [r.status for r in result.items] == ["ok", "failed", "ok", "failed", "ok"]
    assert result.exit_code == 1
    assert str(tmp_path / "no-such-model") in result.items[1].error
    assert str(bad_yaml) in result.items[3].error and "YAML" in result.items[3].error
    assert max_overlap([r for r in result.items if r.started]) == 1
    for path, item in zip(paths, result.items, strict=True):
        if item.status != "ok":
            assert item.output == "" and item.content_hash == ""
            continue
        out = Path(item.output)
        assert weights(item.output) == plain_merge(path, tmp_path / f"plain-{out.parent.name}")
        with open_checkpoint(item.output) as ckpt:
            assert item.content_hash == ckpt.content_hash()
        files = [f for f in out.iterdir() if f.name != COMMIT_RECORD]
        assert item.bytes_written == sum(f.stat().st_size for f in files)
        assert item.bytes_read > 0 and item.parents["base"][0] == str(zoo_tiny.base)
    assert not (tmp_path / "out-missing").exists()

    registry = Registry(tracking)
    batch_run = registry.client.get_run(result.mlflow_run_id)
    assert batch_run.info.status == "FINISHED" and batch_run.data.tags[BATCH_TAG] == "true"
    assert batch_run.data.metrics["ok"] == 3 and batch_run.data.metrics["failed"] == 2
    rows = logged_rows(tracking)
    assert [r["status"] for r in rows] == [r.status for r in result.items]
    assert [r["content_hash"] for r in rows] == [r.content_hash for r in result.items]
    children = registry.client.search_runs(
        [batch_run.info.experiment_id], f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'"
    )
    by_file = {c.data.tags[BATCH_TAG + ".recipe_file"]: c for c in children}
    assert sorted(by_file) == sorted(str(p) for p in paths)
    for path, item in zip(paths, result.items, strict=True):
        child = by_file[str(path)]
        if item.status == "failed":
            assert child.info.status == "FAILED"
            assert child.data.tags[FAILURE_TAG] == item.error
            continue
        assert child.info.status == "FINISHED"
        assert child.data.tags[CONTENT_TAG] == item.content_hash
        for label, (uri, digest) in item.parents.items():
            assert child.data.tags[f"{PARENT_TAG}{label}.uri"] == uri
            assert child.data.tags[f"{PARENT_TAG}{label}.hash"] == digest
        assert child.data.metrics["bytes_written"] == item.bytes_written

    again = run_batch(paths, concurrency=3, retries=1, tracking_uri=tracking)
    assert [r.status for r in again.items] == ["skipped", "failed", "skipped", "failed", "skipped"]
    for first, second in zip(result.items, again.items, strict=True):
        assert (second.output, second.content_hash) == (first.output, first.content_hash)
        assert second.bytes_written == 0
    assert max_overlap([r for r in again.items if r.started]) <= 3
    assert again.exit_code == 1


@pytest.mark.slow
def test_the_command_runs_on_the_cluster_at_its_address(
    zoo_tiny, tmp_path: Path, ray_up: str
) -> None:
    (path,) = good_recipes(zoo_tiny, tmp_path, [0.2])
    home = tmp_path / "home"
    env = {**process_env(home), "RAY_ADDRESS": "127.0.0.1:1"}  # the option wins over it
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = ["-m", "amalgam.cli", "batch", str(path), "--address", ray_up]
    done = run_process([*command, "--tracking-uri", tracking], env)

    assert done.code == 0, done.tail
    assert "1 ok, 0 skipped, 0 failed" in done.out
    assert not (home / "ray").exists()  # no Ray of its own: it joined this module's
    out = load_recipe(path).output
    assert weights(out) == plain_merge(path, tmp_path / "plain")


def test_gpus_no_node_has_are_refused_before_anything_runs(
    zoo_tiny, tmp_path: Path, ray_up: str
) -> None:
    (path,) = good_recipes(zoo_tiny, tmp_path, [0.2])
    with pytest.raises(
        AmalgamError, match=r"gpus: 0\.5 per recipe asked, and the Ray cluster has no GPU"
    ):
        run_batch([path], gpus=0.5, experiment=None)
    assert not Path(load_recipe(path).output).parent.exists()


@pytest.fixture
def short() -> Iterator[Path]:
    """A folder with a short path: Ray's session folder holds unix sockets (107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="batch-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_the_command_retries_a_killed_worker_and_exits_1_for_a_failed_recipe(
    zoo_tiny, tmp_path: Path, short: Path
) -> None:
    good = good_recipes(zoo_tiny, tmp_path, [0.4, 0.6])
    paths = [good[0], missing_input(zoo_tiny, tmp_path), good[1]]
    killed = tmp_path / "killed-worker"  # the one worker that dies writes its pid here
    env = process_env(short, KILL, killed)
    env.pop("RAY_ADDRESS", None)  # a Ray of its own, whose workers inherit the kill point
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = ["-m", "amalgam.cli", "batch", *map(str, paths), "--concurrency", "2"]
    done = run_process([*command, "--retries", "1", "--tracking-uri", tracking], env)

    assert done.code == 1, done.tail
    pid = int(killed.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # a worker died mid-merge, and its recipe finished on the retry
    for path in good:
        out = Path(load_recipe(path).output)
        assert weights(str(out)) == plain_merge(path, tmp_path / f"plain-{out.parent.name}")
    assert "2 ok, 0 skipped, 1 failed" in done.out
    rows = logged_rows(tracking)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "no-such-model" in rows[1]["error"]


@pytest.mark.slow
def test_a_recipe_whose_worker_always_dies_fails_and_leaves_no_output(
    zoo_tiny, tmp_path: Path, short: Path
) -> None:
    (path,) = good_recipes(zoo_tiny, tmp_path, [0.5])
    env = process_env(short, KILL)  # every run of the recipe dies
    env.pop("RAY_ADDRESS", None)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = ["-m", "amalgam.cli", "batch", str(path), "--retries", "1"]
    done = run_process([*command, "--tracking-uri", tracking], env)

    assert done.code == 1, done.tail
    (row,) = logged_rows(tracking)
    assert row["status"] == "failed"
    assert row["error"] == "its Ray worker was lost 2 times (WorkerCrashedError)"
    assert not Path(load_recipe(path).output).exists()


def logged_rows(tracking: str) -> list[dict]:
    """The rows of the one batch run in the store at ``tracking``."""
    registry = Registry(tracking)
    (batch_run,) = registry.client.search_runs(
        [registry.experiment_id("amalgam-batch")], f"tags.`{BATCH_TAG}` = 'true'"
    )
    table = json.loads(registry.run_text(batch_run.info.run_id, "batch.json"))
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["nope.yaml"], "nope.yaml: no such recipe file (nothing was run)"),
        (["good.yaml", "--concurrency", "0"], "concurrency: 0 is not a positive number"),
    ],
)
def test_bad_command_input_is_one_error_line_and_runs_nothing(
    zoo_tiny, tmp_path: Path, args: list[str], error: str
) -> None:
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(recipe(zoo_tiny, Place("out", {}))))
    done = run_process(["-m", "amalgam.cli", "batch", *args], process_env(tmp_path))
    assert done.code == 2, done.tail
    (line,) = done.err.strip().splitlines()
    assert line.startswith(f"error: {error}"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.yaml", "prefect"]


@pytest.mark.slow
def test_a_storage_failure_is_retried_and_a_recipe_error_is_not(s3, tmp_path: Path) -> None:
    bucket = s3.make_bucket(f"batch-{uuid.uuid4().hex[:8]}")
    upload_family(s3, tmp_path / "family", bucket)
    with fault_proxy_for(s3.endpoint_url) as proxy:
        options = s3.storage_options(
            proxy.url,
            skip_instance_cache=True,
            config_kwargs={"retries": {"max_attempts": 2, "mode": "standard"}},
        )
        # the store clients' own retry budget for one write: every attempt of it reset
        budget = Rule("reset-request", RECORD, "PUT", times=ALWAYS)
        proxy.reset(budget)
        with pytest.raises(Exception, match=r"amalgam-commit\.json") as raised:
            storage.resolve(f"s3://{bucket}/probe/out", **options)[0].pipe_file(
                f"{bucket}/probe/out/amalgam-commit.json", b"{}"
            )
        assert is_transient(raised.value) and budget.fired > 1
        body = {
            "method": "task_arithmetic",
            "base": f"s3://{bucket}/base",
            "models": [{"uri": f"s3://{bucket}/expert{i}"} for i in range(3)],
            "output": f"s3://{bucket}/merged/out",
            "storage_options": options,
        }
        # the first run's commit exhausts that budget; the recipe's retry writes it whole
        fault = Rule("reset-request", RECORD, "PUT", times=budget.fired)
        proxy.reset(fault)
        item = run_recipe_item("flaky.yaml", parse_recipe(body), retries=1)
        assert fault.fired == budget.fired
        assert (item.status, item.attempts, item.error) == ("ok", 2, "")

        missing = {**body, "base": f"s3://{bucket}/no-such-base", "output": f"s3://{bucket}/x"}
        failed = run_recipe_item("missing.yaml", parse_recipe(missing), retries=3)
        assert (failed.status, failed.attempts) == ("failed", 1)
        assert f"{bucket}/no-such-base" in failed.error

    direct = s3.storage_options(skip_instance_cache=True)
    plain = {**body, "output": f"s3://{bucket}/plain/out", "storage_options": direct}
    run_merge(parse_recipe(plain))
    assert intact(*storage.resolve(item.output, **direct))
    assert weights(item.output, **direct) == weights(plain["output"], **direct)


def test_a_local_output_is_refused_only_on_a_cluster_of_several_nodes(zoo_tiny) -> None:
    local = parse_recipe(recipe(zoo_tiny, Place("/tmp/merged-here", {})))
    default = local.model_copy(update={"output": None})  # under $AMALGAM_HOME: local too
    shared = local.model_copy(update={"output": "s3://bucket/merged"})
    assert local_output_error(local, 1) == local_output_error(default, 1) == ""
    assert local_output_error(shared, 3) == ""
    error = local_output_error(local, 3)
    assert (
        error.startswith("output: /tmp/merged-here/merged is a local path") and "3 nodes" in error
    )
    assert "is a local path" in local_output_error(default, 2)
