"""MLflow registry: runs, versions, lineage, the promotion policy, gates and promotion on a real
SQLite store and a real `mlflow server`."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from amalgam.checkpoint import open_checkpoint
from amalgam.engine import run_merge
from amalgam.evaluate.report import EvalReport, build_report, write_report
from amalgam.evaluate.results import ModelResult
from amalgam.recipe import REDACTED, Gates, Recipe, parse_recipe
from amalgam.registry import (
    CONTENT_TAG,
    FAILURE_TAG,
    OWNER_TAG,
    Policy,
    PromotionRefused,
    Registered,
    Registry,
    RegistryError,
    StoreUnavailable,
    check_gates,
    recipe_record,
)
from tests.helpers import family, recipe_dict, run_cli

T, F = True, False
REPO = Path(__file__).resolve().parents[1]


def report(
    candidate: dict, *, champion: dict | None = None, version: str | None = None, nll: float = 10.0
) -> EvalReport:
    """A report built from hand-written per-example results; experts score every example."""
    tasks = list(candidate)
    experts = {
        t: ModelResult.from_correct(f"/e/{t}", {t: [T] * len(c)}) for t, c in candidate.items()
    }
    return build_report(
        tasks,
        ModelResult.from_correct("/c", candidate, nll=nll, tokens=10),
        base=ModelResult.from_correct(
            "/b", {t: [F] * len(c) for t, c in candidate.items()}, nll=10.0, tokens=10
        ),
        experts=experts,
        champion=ModelResult.from_correct("/champ", champion) if champion else None,
        champion_version=version,
    )


GOOD = {"sort": [T, T, T, T], "count": [T, T, T, F]}
GATES = Gates(task_floor=0.7, max_negative_flip_rate=0.2, max_perplexity_ratio=1.5)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """One SQLite store for the module (creating its tables takes seconds); each test
    registers under its own model name."""
    root = tmp_path_factory.mktemp("mlflow")
    return Registry(f"sqlite:///{root}/mlflow.db", artifact_root=str(root / "artifacts"))


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return request.node.name.removeprefix("test_")[:60]


@pytest.fixture
def merged(tmp_path: Path) -> tuple[Recipe, Path, dict[str, tuple[str, str]]]:
    base, experts = family(tmp_path / "in", n=2)
    data = recipe_dict(base, experts, "task_arithmetic", tmp_path / "merged")
    data["register"] = {"model_name": "zoo-merge", "gates": GATES.model_dump()}
    data["storage_options"] = {"key": "secret-key"}
    recipe = parse_recipe(data)
    run_merge(recipe)
    parents = {}
    for label, uri in [("base", base), *[(m.label, m.uri) for m in recipe.models]]:
        with open_checkpoint(str(uri)) as c:
            parents[label] = (str(uri), c.content_hash())
    return recipe, tmp_path / "merged", parents


def log(registry: Registry, merged, rep: EvalReport, tmp_path: Path, name: str) -> str:
    recipe, folder, parents = merged
    files = write_report(rep, tmp_path / f"report-{time.monotonic_ns()}")
    run_id = registry.log_pipeline_run(
        recipe, parents=parents, merged_uri=str(folder), report=rep, artifacts=files
    )
    return registry.register_version(run_id, name)


def test_lineage_walks_from_a_version_to_recipe_parents_and_metrics(
    registry: Registry, merged, tmp_path: Path, name: str
) -> None:
    recipe, folder, parents = merged
    rep = report(GOOD)
    version = log(registry, merged, rep, tmp_path, name)
    assert version == "1" and registry.alias_version(name, "candidate") == "1"
    lineage = registry.lineage(name, "candidate")
    assert lineage.version == "1" and "candidate" in lineage.aliases
    assert lineage.recipe == recipe_record(recipe)
    assert "storage_options" not in lineage.recipe
    assert lineage.recipe_hash == recipe.hash()
    assert lineage.merged_uri == str(folder)
    assert {label: (p.uri, p.hash) for label, p in lineage.parents.items()} == parents
    for label, (uri, digest) in parents.items():  # the hashes still identify the parents
        with open_checkpoint(uri) as c:
            assert c.content_hash() == digest, label
    assert lineage.metrics == pytest.approx(rep.metrics())
    run = registry.client.get_run(lineage.run_id)
    assert run.data.params["method"] == "task_arithmetic"
    assert run.data.params["models.1.uri"] == recipe.models[1].uri
    assert not any("secret" in v for v in run.data.params.values())
    artifacts = {a.path for a in registry.client.list_artifacts(lineage.run_id, "report")}
    assert artifacts == {
        f"report/{n}" for n in ("report.json", "accuracy.png", "normalized_accuracy.png")
    }
    model = Path(registry.model_path(name, "1"))
    assert (model / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert registry.report(lineage.run_id) == rep


def test_gates_refuse_a_regressing_candidate_and_the_reason_is_on_the_run(
    registry: Registry, merged, tmp_path: Path, name: str
) -> None:
    first = log(registry, merged, report(GOOD), tmp_path, name)
    registry.set_policy(name, GATES)
    assert registry.promote(name, first).previous is None
    # regresses 'sort': 2 of 4 right (below the 0.7 floor), 2 negative flips (rate 0.5 > 0.2)
    worse = report({"sort": [T, F, T, F], "count": [T, T, T, T]}, champion=GOOD, version=first)
    second = log(registry, merged, worse, tmp_path, name)
    with pytest.raises(PromotionRefused) as err:
        registry.promote(name, second)
    assert err.value.gates == ["max_negative_flip_rate", "task_floor"]
    assert "task_floor: task sort normalized_accuracy 0.5000 < floor 0.7" in str(err.value)
    assert "max_negative_flip_rate: task sort negative flip rate 0.5000 > 0.2" in str(err.value)
    assert registry.alias_version(name, "champion") == first
    tags = registry.client.get_run(registry.lineage(name, second).run_id).data.tags
    assert tags["amalgam.promotion"] == "refused"
    assert "task_floor: task sort" in tags["amalgam.promotion.reason"]

    better = report({"sort": [T, T, T, T], "count": [T, T, T, T]}, champion=GOOD, version=first)
    third = log(registry, merged, better, tmp_path, name)
    result = registry.promote(name, third)
    assert (result.version, result.previous) == (third, first)
    assert registry.alias_version(name, "champion") == third
    tags = registry.client.get_run(registry.lineage(name, third).run_id).data.tags
    assert tags["amalgam.promotion"] == "promoted"
    assert registry.promotion(registry.lineage(name, first).run_id).outcome == "promoted"
    refused = registry.promotion(registry.lineage(name, second).run_id)
    assert refused.outcome == "refused" and "task_floor: task sort" in refused.reason
    assert registry.lineage(name, third).gates() == GATES


def register(registry: Registry, merged, rep: EvalReport, name: str, gates: dict) -> str:
    """Register the merge as a new version of ``name`` (a new content hash each time) whose
    recipe asks for ``gates``."""
    recipe, folder, parents = merged
    data = recipe_record(recipe) | {"register": {"model_name": name, "gates": gates}}
    return registry.register_merge(
        parse_recipe(data),
        model_name=name,
        content_hash=f"sha256:{time.monotonic_ns()}",
        parents=parents,
        merged_uri=str(folder),
        report=rep,
    ).version


def test_the_registry_policy_decides_and_a_candidate_recipe_cannot_weaken_it(
    registry: Registry, merged, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # the registration that creates the model records its recipe's gates as the policy
    first = register(registry, merged, report(GOOD), name, GATES.model_dump())
    policy = registry.policy(name)
    assert policy.gates == GATES and "the registration that created" in policy.source
    assert registry.promote(name, first).previous is None
    # a candidate whose recipe says `gates: {}` and whose report misses the 0.7 floor on sort
    # (2 of 4 where the expert gets 4; the champion got the same wrong, so no flips)
    floor_only = report(
        {"sort": [T, T, F, F], "count": [T, T, T, T]},
        champion={"sort": [T, T, F, F], "count": [T, T, T, F]},
        version=first,
    )
    lax = register(registry, merged, floor_only, name, {})
    assert registry.lineage(name, lax).gates() == Gates()
    assert registry.policy(name) == policy  # a later registration does not replace it
    with (
        caplog.at_level("WARNING", logger="amalgam.registry"),
        pytest.raises(PromotionRefused) as err,
    ):
        registry.promote(name, lax)
    assert err.value.gates == ["task_floor"]
    assert err.value.failures == [
        "task_floor: task sort normalized_accuracy 0.5000 < floor 0.7 (registry policy)"
    ]
    assert "were ignored: the policy decides" in caplog.text
    assert registry.alias_version(name, "champion") == first
    refused = registry.promotion(registry.lineage(name, lax).run_id)
    assert "(registry policy)" in refused.reason and "were ignored" in refused.reason
    assert refused.policy == policy.key  # the policy that decided is recorded with the outcome
    # stricter recipe gates do not decide either: the policy alone does
    strict = register(registry, merged, floor_only, name, {"task_floor": 0.99})
    assert registry.policy(name) == policy
    # an operator changes the policy explicitly, and that changes the outcome
    lowered = registry.set_policy(name, Gates(task_floor=0.4), source="operator")
    assert registry.policy(name) == lowered and lowered.source.startswith("operator, ")
    result = registry.promote(name, strict)
    assert (result.version, result.previous) == (strict, first)
    assert registry.alias_version(name, "champion") == strict


def test_no_policy_no_promotion_and_an_old_model_takes_its_champion_gates(
    registry: Registry, merged, tmp_path: Path, name: str
) -> None:
    # registered without a policy (register_version alone) and no champion: nothing decides
    first = log(registry, merged, report(GOOD), tmp_path, name)
    assert registry.policy(name) is None
    with pytest.raises(PromotionRefused) as err:
        registry.promote(name, first)
    assert err.value.gates == ["policy"]
    assert f"`amalgam policy {name} --gates FILE`" in str(err.value)
    # a model registered before policies existed: its champion's recorded gates decide
    registry.set_alias(name, "champion", first)
    worse = report({"sort": [T, F, T, F], "count": [T, T, T, T]}, champion=GOOD, version=first)
    second = log(registry, merged, worse, tmp_path, name)
    with pytest.raises(PromotionRefused) as err:
        registry.promote(name, second)
    assert err.value.gates == ["max_negative_flip_rate", "task_floor"]
    policy = registry.policy(name)
    assert policy.gates == GATES and policy.source.startswith(f"recipe of champion version {first}")
    assert policy == Policy(GATES, policy.source)


def test_the_policy_command_sets_and_shows_the_gates(
    registry: Registry, tmp_path: Path, name: str, monkeypatch, capsys
) -> None:
    uri = ["--tracking-uri", registry.tracking_uri]
    code, _, err = run_cli(["policy", name, "--show", *uri], monkeypatch, capsys)
    assert code == 2 and f"error: {name}: no promotion policy in the registry" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("task_flor: 0.5\n")
    code, _, err = run_cli(["policy", name, "--gates", str(bad), *uri], monkeypatch, capsys)
    assert code == 2 and "task_flor: Extra inputs are not permitted" in err
    assert registry.policy(name) is None
    good = tmp_path / "gates.yaml"
    good.write_text("task_floor: {sort: 0.8}\nmax_negative_flip_rate: 0.1\n")
    code, out, err = run_cli(["policy", name, "--gates", str(good), *uri], monkeypatch, capsys)
    assert code == 0, err
    wanted = Gates(task_floor={"sort": 0.8}, max_negative_flip_rate=0.1)
    assert registry.policy(name).gates == wanted
    code, shown, _ = run_cli(["policy", name, "--show", *uri], monkeypatch, capsys)
    assert code == 0 and json.loads(shown) == json.loads(out)
    assert json.loads(shown)["gates"] == {
        "task_floor": {"sort": 0.8},
        "floor_metric": "normalized_accuracy",
        "max_negative_flip_rate": 0.1,
    }
    assert json.loads(shown)["source"].startswith(f"operator (amalgam policy --gates {good})")


def test_register_merge_tags_the_content_and_find_version_reads_it_back(
    registry: Registry, merged, name: str
) -> None:
    recipe, folder, parents = merged
    assert registry.find_version(name, "sha256:abc") is None  # no such model yet
    registered = registry.register_merge(
        recipe,
        model_name=name,
        content_hash="sha256:abc",
        parents=parents,
        merged_uri=str(folder),
        compressed={"ratio": 9.5},
    )
    assert registered.created and registry.promotion(registered.run_id) is None
    found = registry.find_version(name, "sha256:abc")
    assert found == Registered(name, registered.version, registered.run_id, created=False)
    assert registry.find_version(name, "sha256:other") is None
    tags = registry.lineage(name, registered.version).tags
    assert tags["amalgam.compressed.ratio"] == "9.5"


def test_log_leaderboard_records_rows_grid_and_best(registry: Registry) -> None:
    rows = [
        {"candidate": "a", "mean_accuracy": 0.9, "mean_normalized_accuracy": None},
        {"candidate": "b", "mean_accuracy": 0.5, "mean_normalized_accuracy": 0.4},
    ]
    run_id = registry.log_leaderboard(
        "sweeps", rows, metric="mean_accuracy", grid={"methods": {"linear": {}}}
    )
    run = registry.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["best"] == "a"
    paths = {a.path for a in registry.client.list_artifacts(run_id)}
    assert {"leaderboard.json", "grid.json"} <= paths
    history = registry.client.get_metric_history(run_id, "mean_accuracy")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [0.9, 0.5]


def test_check_gates_names_gate_task_and_values() -> None:
    rep = report({"sort": [T, F, F, F], "count": [T, T, T, T]}, nll=20.0)
    assert check_gates(rep, Gates()) == []
    assert check_gates(rep, Gates(max_negative_flip_rate=0.0)) == []  # no champion yet
    assert check_gates(rep, Gates(task_floor={"count": 0.9, "nosuch": 0.5})) == [
        "task_floor: task nosuch is not in the report"
    ]
    assert check_gates(rep, Gates(task_floor=0.3, floor_metric="accuracy")) == [
        "task_floor: task sort accuracy 0.2500 < floor 0.3"
    ]
    (ppl,) = check_gates(rep, Gates(max_perplexity_ratio=2.0))
    assert ppl.startswith("max_perplexity_ratio: perplexity ratio 2.7183 > 2.0")
    no_base = build_report(["sort"], ModelResult.from_correct("/c", {"sort": [T]}))
    assert check_gates(no_base, Gates(max_perplexity_ratio=2.0)) == [
        "max_perplexity_ratio: the report has no perplexity ratio"
    ]
    assert check_gates(no_base, Gates(task_floor=0.5)) == [
        "task_floor: task sort has no normalized_accuracy (no expert for it)"
    ]


PROMOTE = """
import sys, time
from pathlib import Path
from amalgam.registry import PromotionRefused, Registry
uri, name, version, go = sys.argv[1:5]
registry = Registry(uri)
while not Path(go).exists():
    time.sleep(0.01)
try:
    registry.promote(name, version)
    print("promoted")
except PromotionRefused as exc:
    print("refused", ",".join(exc.gates))
"""


@pytest.mark.slow
def test_two_promotions_at_once_cannot_both_win(
    registry: Registry, merged, tmp_path: Path, name: str
) -> None:
    first = log(registry, merged, report(GOOD), tmp_path, name)
    registry.set_policy(name, Gates(task_floor=0.5))
    registry.promote(name, first)
    a = log(registry, merged, report(GOOD, champion=GOOD, version=first), tmp_path, name)
    b = log(registry, merged, report(GOOD, champion=GOOD, version=first), tmp_path, name)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROMOTE, registry.tracking_uri, name, v, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for v in (a, b)
    ]
    time.sleep(1.0)
    go.touch()
    outcomes = sorted(p.communicate(timeout=240)[0].strip() for p in procs)
    assert outcomes == ["promoted", "refused champion"]
    assert registry.alias_version(name, "champion") in (a, b)


def test_a_failed_registration_leaves_no_version(
    registry: Registry, merged, tmp_path: Path
) -> None:
    from mlflow.exceptions import MlflowException

    recipe, folder, parents = merged
    run_id = registry.log_pipeline_run(recipe, parents=parents, merged_uri=str(folder))
    with pytest.raises(RegistryError, match="reserved"):
        registry.register_version(run_id, "fresh", alias="latest")
    with pytest.raises(MlflowException):
        registry.client.get_registered_model("fresh")
    assert registry.register_version(run_id, "kept") == "1"
    with pytest.raises(RegistryError, match="reserved"):
        registry.register_version(run_id, "kept", alias="v7")
    versions = registry.client.search_model_versions("name='kept'")
    assert [str(v.version) for v in versions] == ["1"]
    bare = registry.log_pipeline_run(
        recipe, parents=parents, merged_uri=str(folder), log_model=False
    )
    with pytest.raises(RegistryError, match="no artifacts under 'model'"):
        registry.register_version(bare, "kept")


def test_default_store_lives_under_amalgam_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, merged
) -> None:
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    registry = Registry()
    assert registry.tracking_uri == f"sqlite:///{tmp_path}/home/mlflow/mlflow.db"
    recipe, folder, parents = merged
    run_id = registry.log_pipeline_run(recipe, parents=parents, merged_uri=str(folder))
    artifact_uri = registry.client.get_run(run_id).info.artifact_uri
    assert artifact_uri.startswith((tmp_path / "home" / "mlflow" / "artifacts").as_uri())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_through_a_real_mlflow_server(merged, tmp_path: Path, name: str) -> None:
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            (tmp_path / "server-artifacts").as_uri(),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server not healthy within 90 s"
            time.sleep(0.5)
        registry = Registry(url)
        recipe, folder, parents = merged
        version = log(registry, merged, report(GOOD), tmp_path, name)
        lineage = registry.lineage(name, "candidate")
        assert lineage.version == version
        assert {label: (p.uri, p.hash) for label, p in lineage.parents.items()} == parents
        assert lineage.recipe == recipe_record(recipe)
        registry.set_policy(name, GATES)
        assert registry.policy(name).gates == GATES
        registry.promote(name, version)
        assert registry.alias_version(name, "champion") == version
        local = Path(registry.model_path(name, "champion", dst=str(tmp_path / "dl")))
        assert (local / "model.safetensors").read_bytes() == (
            folder / "model.safetensors"
        ).read_bytes()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_the_lock_is_reentrant_in_a_thread_and_exclusive_across_threads(
    registry: Registry, name: str
) -> None:
    import threading

    errors: list[Exception] = []

    def other_thread() -> None:
        try:
            with registry.lock(name, timeout=0.3):
                pass
        except RegistryError as exc:
            errors.append(exc)

    with registry.lock(name), registry.lock(name):
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert len(errors) == 1 and "another promotion holds" in str(errors[0])
    t = threading.Thread(target=other_thread)  # released: the other thread gets it now
    t.start()
    t.join()
    assert len(errors) == 1


def test_a_run_that_cannot_be_registered_is_failed_with_its_reason(
    registry: Registry, merged, tmp_path: Path
) -> None:
    recipe, _, parents = merged
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RegistryError, match="no artifacts under 'model'"):
        registry.register_merge(
            recipe,
            model_name="never",
            content_hash="sha256:never",
            parents=parents,
            merged_uri=str(empty),
        )
    assert registry.find_version("never", "sha256:never") is None
    runs = registry.client.search_runs(
        [registry.experiment_id(recipe.register.experiment)],
        f"tags.`{CONTENT_TAG}` = 'sha256:never'",
    )
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "no artifacts under 'model'" in runs[0].data.tags[FAILURE_TAG]


def test_a_failing_store_is_named_and_a_deleted_one_is_not_recreated(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store}/mlflow.db"
    registry = Registry(uri)
    registry.experiment_id("before")
    assert registry.alias_version("none", "champion") is None  # a refusal, not a failure
    shutil.rmtree(store)
    with pytest.raises(StoreUnavailable, match=re.escape(f"MLflow store {uri} failed")):
        registry.client.create_experiment("after")
    with pytest.raises(StoreUnavailable, match="does not exist"):
        Registry(uri)
    assert not store.exists()
    down = Registry(f"http://amalgam:hunter2@127.0.0.1:{free_port()}")
    with pytest.raises(StoreUnavailable, match="Connection refused") as refused:
        down.alias_version("m", "champion")
    assert "hunter2" not in str(refused.value) and REDACTED in str(refused.value)


def test_a_run_whose_process_died_is_closed_by_the_next_run(
    registry: Registry, merged, tmp_path: Path
) -> None:
    """A run left RUNNING by a process that died (on this host) is marked KILLED, with why, when
    the next run is logged; a RUNNING run whose process lives, or of another host, is kept."""
    recipe, folder, parents = merged
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    exp = registry.experiment_id("amalgam")
    host = socket.gethostname()
    owners = {
        "dead": f"{host}:{dead}",
        "alive": f"{host}:{os.getpid()}",
        "away": f"elsewhere:{dead}",
    }
    left = {
        k: registry.client.create_run(exp, tags={OWNER_TAG: v}).info.run_id
        for k, v in owners.items()
    }
    new = registry.log_pipeline_run(recipe, parents=parents, merged_uri=str(folder))
    runs = {k: registry.client.get_run(run_id) for k, run_id in left.items()}
    assert runs["dead"].info.status == "KILLED"
    assert f"{host}:{dead}" in runs["dead"].data.tags[FAILURE_TAG]
    assert runs["alive"].info.status == runs["away"].info.status == "RUNNING"
    assert registry.client.get_run(new).info.status == "FINISHED"
    assert registry.client.get_run(new).data.tags[OWNER_TAG] == f"{host}:{os.getpid()}"
    for k in ("alive", "away"):
        registry.client.set_terminated(left[k], "FINISHED")
