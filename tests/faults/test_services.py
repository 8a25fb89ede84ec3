"""Faults of the services the pipeline talks to: the MLflow store during register (a SQLite
store on a file system remounted read-only, a store deleted mid-run, a real ``mlflow server``
killed before register) and a Prefect home that does not exist yet.

Each store fault: ``amalgam run`` and ``amalgam promote`` end in one ``error:`` line naming the
store, exit 2, no traceback; the store holds no run left RUNNING, no FAILED run without a
reason tag and no new version; the merged output stays, complete; and once the store is back a
re-run skips the merge and registers exactly one version. A store that fails mid-run fails while
the run waits at a fixed point (its merge stage returned), so the fault lands there however
loaded the machine. The store-fault runs share one Prefect server."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflowserver import MlflowServer, start_mlflow_server
from s3server import free_ports
from zoo.conftest import zoo_tiny

from amalgam import storage
from amalgam.registry import FAILURE_TAG, Registry
from amalgam.writer import intact
from tests.faults.cli import amalgam_process, error_line, printed_result
from tests.faults.kills import killpoint_pythonpath
from tests.faults.test_disk import mount

__all__ = ["mount", "zoo_tiny"]

pytestmark = pytest.mark.slow
MODEL = "services"
#: Where a run waits while a test breaks its store: its merge stage returned (the output is
#: committed), evaluation and register are still to come.
AFTER_MERGE = "amalgam.stages.merge:MergeStage.run:1:after"


def recipe(zoo, output: Path, tracking_uri: str, lam: float) -> dict:
    return {
        "method": "task_arithmetic",
        "base": str(zoo.base),
        "models": [{"uri": str(zoo.experts[e])} for e in ("zoo_mulmod", "zoo_compare")],
        "params": {"lambda": lam},
        "dtype": "float32",
        "output": str(output),
        "evaluate": {
            "tasks_dir": str(zoo.tasks_dir),
            "tasks": ["zoo_mulmod", "zoo_compare"],
            "limit": 8,
            "engine": "quick",
            "device": "cpu",
            "perplexity": False,
        },
        "register": {"tracking_uri": tracking_uri, "model_name": MODEL},
    }


@dataclass(frozen=True)
class Baseline:
    """A store (``store/mlflow.db`` and its artifacts) holding version 1 of the model; ``env``
    points a run at the module's Prefect server."""

    root: Path
    store: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[dict[str, str]]:
    """One Prefect server for the module's store-fault runs, as the environment that points a
    run at it: each run then skips starting a temporary server of its own (about 12 s of a
    17 s command). The Prefect-home tests start their own, as a first run does."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield {"PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.fixture(scope="module")
def baseline(
    zoo_tiny, prefect_api: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Baseline:
    root = tmp_path_factory.mktemp("services")
    store = root / "store"
    store.mkdir()
    path = root / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(recipe(zoo_tiny, root / "merged", f"sqlite:///{store}/mlflow.db", 0.5))
    )
    done = amalgam_process(["run", str(path)], root / "work", prefect_api)
    assert done.returncode == 0, done.stderr[-3000:]
    assert printed_result(done.stdout)["registered"]["version"] == "1"
    return Baseline(root, store, prefect_api)


class Pause:
    """``action`` run while a process started with ``env`` waits at ``point``
    (``killpoint/sitecustomize.py``); the process goes on once the action is done, whether it
    raised or not, so the fault lands at that point of the run however loaded the machine."""

    def __init__(self, folder: Path, point: str, action: Callable[[], None]):
        folder.mkdir()
        self.folder, self.point = folder, point
        self.env = {
            "PYTHONPATH": killpoint_pythonpath(),
            "AMALGAM_TEST_PAUSE": point,
            "AMALGAM_TEST_PAUSE_DIR": str(folder),
        }
        self.acted = False
        self.error: BaseException | None = None
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._act, args=(action,), daemon=True)
        self._thread.start()

    def _act(self, action: Callable[[], None]) -> None:
        try:
            while not (self.folder / "paused").exists():
                if self._ended.wait(0.02):
                    return
            action()
            self.acted = True
        except BaseException as exc:  # re-raised by check(), in the test's thread
            self.error = exc
        finally:
            (self.folder / "resume").touch()

    def check(self) -> None:
        """Once the process has ended: it reached the point and the action ran."""
        self._ended.set()
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.acted, f"the run ended without reaching {self.point}"


def check_store(tracking_uri: str, versions: int) -> None:
    """No run RUNNING, every FAILED run with its reason, ``versions`` versions of the model."""
    registry = Registry(tracking_uri)
    experiments = [e.experiment_id for e in registry.client.search_experiments()]
    runs = registry.client.search_runs(experiments)
    assert runs
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    for run in runs:
        if run.info.status == "FAILED":
            assert run.data.tags.get(FAILURE_TAG), run.info.run_id
    assert len(registry.client.search_model_versions(f"name = '{MODEL}'")) == versions


def fault_and_recovery(
    zoo,
    case: Path,
    tracking_uri: str,
    store: str,
    *,
    env: dict[str, str],
    breaks: Callable[[], None],
    restores: Callable[[], None],
    mid_run: bool = True,
) -> None:
    """A candidate merged while the store fails (``breaks()``: while the run waits with its
    merge committed, or before the run when not ``mid_run``), then promote; both end in one
    error line naming ``store``. After ``restores()``: the store is as it was, and a re-run
    registers the kept merge once. Every command runs with ``env``."""
    case.mkdir(exist_ok=True)
    output = case / "merged"
    path = case / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(zoo, output, tracking_uri, 0.7)))
    work = case / "work"
    if mid_run:
        pause = Pause(case / "pause", AFTER_MERGE, breaks)
        failed = amalgam_process(["run", str(path)], work, env | pause.env)
        pause.check()
    else:
        breaks()
        failed = amalgam_process(["run", str(path)], work, env)
    assert store in error_line(failed)
    promote = ["promote", MODEL, "1", "--tracking-uri", tracking_uri]
    refused = amalgam_process(promote, work, env)
    assert store in error_line(refused)
    # the merge is complete and stays; nothing half-written next to it
    fs, where = storage.resolve(str(output))
    assert intact(fs, where)
    assert sorted(p.name for p in case.iterdir() if p.name.startswith(".")) == []

    restores()
    check_store(tracking_uri, versions=1)
    rerun = amalgam_process(["run", str(path)], work, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = printed_result(rerun.stdout)
    assert result["skipped_merge"]
    assert result["registered"]["created"] and result["registered"]["version"] == "2"
    check_store(tracking_uri, versions=2)
    found = Registry(tracking_uri).find_version(MODEL, result["content_hash"])
    assert found is not None and found.version == "2"


def test_a_read_only_store(zoo_tiny, baseline: Baseline, mount, tmp_path: Path) -> None:
    disk = mount("size=64m")
    shutil.copytree(baseline.store, disk, dirs_exist_ok=True)
    uri = f"sqlite:///{disk}/mlflow.db"

    def remount(mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)

    fault_and_recovery(
        zoo_tiny,
        tmp_path,
        uri,
        uri,
        env=baseline.env,
        breaks=lambda: remount("ro"),
        restores=lambda: remount("rw"),
        mid_run=False,
    )


def test_a_store_deleted_mid_run(zoo_tiny, baseline: Baseline, tmp_path: Path) -> None:
    store, backup = tmp_path / "store", tmp_path / "backup"
    shutil.copytree(baseline.store, store)
    shutil.copytree(baseline.store, backup)
    uri = f"sqlite:///{store}/mlflow.db"
    fault_and_recovery(
        zoo_tiny,
        tmp_path / "case",
        uri,
        uri,
        env=baseline.env,
        breaks=lambda: shutil.rmtree(store),
        restores=lambda: shutil.copytree(backup, store),
    )


class ServerStore:
    """An ``mlflow server`` over a copy of the baseline store, started again on the same port
    after it is killed."""

    def __init__(self, root: Path):
        self.root, (self.port,) = root, free_ports(1)
        self.started: list[MlflowServer] = []

    def start(self) -> str:
        self.started.append(start_mlflow_server(self.root, self.port))
        return self.started[-1].url

    def kill(self) -> None:
        self.started[-1].stop()

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def server_store(baseline: Baseline, tmp_path: Path) -> Iterator[ServerStore]:
    shutil.copytree(baseline.store, tmp_path / "server")
    servers = ServerStore(tmp_path / "server")
    yield servers
    servers.stop_all()


def test_a_tracking_server_killed_before_register(
    zoo_tiny, baseline: Baseline, server_store: ServerStore, tmp_path: Path
) -> None:
    url = server_store.start()
    fault_and_recovery(
        zoo_tiny,
        tmp_path / "case",
        url,
        url,
        env=baseline.env,
        breaks=server_store.kill,
        restores=lambda: server_store.start() and None,
    )


def test_a_fresh_home_that_does_not_exist_yet(baseline: Baseline, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"  # neither AMALGAM_HOME nor PREFECT_HOME exists
    started = time.monotonic()
    done = amalgam_process(["run", str(baseline.root / "recipe.yaml")], fresh)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 100  # Prefect's start-up timeout is 120 s
    result = printed_result(done.stdout)
    assert result["skipped_merge"] and not result["registered"]["created"]
    assert (fresh / "prefect" / "prefect.db").exists()


def test_a_prefect_home_that_cannot_be_created(baseline: Baseline, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    home = tmp_path / "file" / "prefect"
    started = time.monotonic()
    done = amalgam_process(
        ["run", str(baseline.root / "recipe.yaml")], tmp_path, {"PREFECT_HOME": str(home)}
    )
    assert f"PREFECT_HOME {home}" in error_line(done)
    assert time.monotonic() - started < 60
