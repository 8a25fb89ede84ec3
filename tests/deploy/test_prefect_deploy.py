"""The deployments as a platform team runs them: ``prefect server start`` on loopback,
``prefect deploy --all`` from ``infra/prefect.yaml``, a process worker polling the ``amalgam``
pool, the nightly deployment run with its own parameters (``configs/nightly.yaml``, pointed at
the test's zoo and ``$AMALGAM_HOME`` by the worker's environment) and its merge registered in
MLflow with its lineage; then the promote deployment on that version, refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil
import pytest
from zoo.conftest import zoo_tiny

from amalgam.checkpoint import open_checkpoint
from amalgam.registry import CANDIDATE, CHAMPION, CONTENT_TAG, Registry, default_tracking_uri
from amalgam_flows.serve import free_port, prefect_server
from tests.deploy.prefect_stack import PrefectStack, worker

__all__ = ["zoo_tiny"]

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXPERTS = ["zoo_compare", "zoo_count"]
MODEL = "zoo-nightly"  # configs/nightly.yaml's register.model_name


def zoo_layout(zoo_tiny, root: Path) -> Path:
    """A zoo as ``configs/nightly.yaml`` reads it (``$ZOO/base``, ``$ZOO/tasks``,
    ``$ZOO/experts``), with two of the tiny zoo's experts dropped in."""
    (root / "experts").mkdir(parents=True)
    (root / "base").symlink_to(zoo_tiny.base)
    (root / "tasks").symlink_to(zoo_tiny.tasks_dir)
    for name in EXPERTS:
        shutil.copytree(zoo_tiny.experts[name], root / "experts" / name)
    return root


def deploy(stack: PrefectStack) -> dict:
    """The work pool and ``prefect deploy --all`` as a platform team runs them (without
    ``$AMALGAM_REPO``: the worker's decides); checks what the server holds and returns the
    nightly deployment."""
    stack.cli("work-pool", "create", "amalgam", "--type", "process")
    stack.cli("deploy", "--all", "--prefect-file", "infra/prefect.yaml")
    deployments = stack.deployments()
    assert set(deployments) == {
        "nightly/nightly",
        "merge-pipeline/merge-pipeline",
        "batch/batch",
        "search/search",
        "promote/promote",
    }
    assert all(d["work_pool_name"] == "amalgam" for d in deployments.values())
    nightly = deployments["nightly/nightly"]
    (schedule,) = nightly["schedules"]
    assert schedule["active"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert nightly["global_concurrency_limit"]["limit"] == 1
    pull = {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $AMALGAM_REPO }}"}}
    assert all(d["pull_steps"] == [pull] for d in deployments.values())
    return nightly


def test_deploy_all_and_a_worker_run_the_nightly_into_mlflow(
    zoo_tiny, tmp_path: Path, monkeypatch
) -> None:
    zoo = zoo_layout(zoo_tiny, tmp_path / "zoo")
    home = tmp_path / "home"
    monkeypatch.setenv("AMALGAM_HOME", str(home))  # the server keeps its state in home/prefect
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "2")
    before = set(psutil.Process().children(recursive=True))  # session fixtures' servers
    started: set[psutil.Process] = set()  # the server, the worker and what they started
    with prefect_server(free_port(0)) as url:
        env = {
            **{k: v for k, v in os.environ.items() if k != "AMALGAM_REPO"},
            "PREFECT_API_URL": url,
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "ZOO": str(zoo),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TQDM_DISABLE": "1",
        }
        stack = PrefectStack(url, env, REPO)
        nightly = deploy(stack)
        stack.env["AMALGAM_REPO"] = str(REPO)  # where the worker's runs start (the pull step)

        log = tmp_path / "worker.log"
        with worker(stack, "amalgam", log):
            run = stack.wait_for_run(stack.run_deployment("nightly/nightly"), 300, log)
            assert run["deployment_id"] == nightly["id"]
            assert run["parameters"] == {"config": "configs/nightly.yaml"}
            registry = Registry(default_tracking_uri())  # configs/nightly.yaml names no store
            version = registry.alias_version(MODEL, CANDIDATE)
            assert version is not None, f"nothing registered as {MODEL}@{CANDIDATE}"
            champion = registry.alias_version(MODEL, CHAMPION)
            # the promote deployment, run by hand on that version: refused either way (gates
            # failed, or its report predates it being champion), the run FAILED naming why
            params = (f"name={MODEL}", f"version={version}")
            refused = stack.run_deployment("promote/promote", *params)
            run = stack.wait_for_run(refused, 120, log, expect="FAILED")
            assert f"{MODEL} version {version} not promoted" in run["state"]["message"]
            started |= set(psutil.Process().children(recursive=True)) - before
        # the server's scheduler has put the next nightly runs on the calendar at 02:00 UTC
        scheduled = stack.api(
            "/flow_runs/filter",
            {
                "flow_runs": {
                    "deployment_id": {"any_": [nightly["id"]]},
                    "state": {"type": {"any_": ["SCHEDULED"]}},
                }
            },
        )
        assert scheduled and all("T02:00:00" in r["expected_start_time"] for r in scheduled)
        started |= set(psutil.Process().children(recursive=True)) - before

    lineage = registry.lineage(MODEL, version)
    for name in EXPERTS:
        with open_checkpoint(zoo / "experts" / name) as expert:
            assert lineage.parents[name].hash == expert.content_hash()
    assert lineage.recipe["method"] == "continual_ta" and lineage.recipe_hash
    with open_checkpoint(registry.model_path(MODEL, version)) as merged:
        assert lineage.tags[CONTENT_TAG] == merged.content_hash()
    assert registry.promotion(lineage.run_id).outcome == "refused"
    assert registry.alias_version(MODEL, CHAMPION) == champion
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
