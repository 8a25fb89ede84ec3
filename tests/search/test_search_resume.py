"""A search killed (SIGKILL) after a generation resumes from its checkpoint and ends with the
trials and best recipe of an uninterrupted run of the same seed; on Ray with two workers the
trials are the same again, each is a nested MLflow run and the best is registered."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from amalgam.search.evolve import STATE_FILE, run_search
from amalgam.search.spec import load_search_spec
from amalgam.search.trial import Scoring, score_candidate, weighted

REPO = Path(__file__).resolve().parents[2]


def trials_of(state: Path) -> list[tuple]:
    with (state / STATE_FILE).open("rb") as fh:
        saved = pickle.load(fh)
    return [(t.index, t.x, t.scores, t.objective) for t in saved.trials]


def outcome(trial: dict) -> dict:
    """A trial without where and how long it ran."""
    return {k: v for k, v in trial.items() if k not in ("seconds", "host")}


def generation_of(state: Path) -> int:
    try:
        with (state / STATE_FILE).open("rb") as fh:
            return pickle.load(fh).generation
    except (FileNotFoundError, EOFError, pickle.UnpicklingError):
        return 0


@pytest.mark.slow
def test_a_killed_search_resumes_to_the_uninterrupted_result(write_spec, tmp_path: Path) -> None:
    spec_file = write_spec(generations=6)
    # the search kills itself (SIGKILL: no clean-up runs) once generation 2 is checkpointed
    code = (
        "import os, signal\n"
        "from amalgam.search.evolve import run_search\n"
        "def killer(generation, best):\n"
        "    if generation == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"run_search({str(spec_file)!r}, progress=killer)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    state = tmp_path / "state"
    assert generation_of(state) == 2
    assert not (state / "result.json").exists()

    resumed = run_search(spec_file)
    assert resumed.resumed_at == 2 and resumed.generations == 6

    spec = load_search_spec(spec_file).model_copy(
        update={"state": str(tmp_path / "fresh"), "output": str(tmp_path / "fresh.yaml")}
    )
    fresh = run_search(spec)
    assert fresh.resumed_at == 0
    assert trials_of(state) == trials_of(tmp_path / "fresh")
    assert outcome(resumed.best) == outcome(fresh.best)
    assert Path(resumed.recipe_file).read_text() == Path(fresh.recipe_file).read_text()

    # the written recipe is the best trial's, and scores as it did (an independent merge)
    best = yaml.safe_load(Path(resumed.recipe_file).read_text())
    weights = [m["params"]["weight"] for m in best["models"]]
    assert weights == list(resumed.best["values"].values())
    from amalgam.recipe import parse_recipe

    tasks = spec.objective.tasks
    again = score_candidate(
        parse_recipe(best),
        Scoring(Path(best["evaluate"]["tasks_dir"]), tuple(tasks), {"validation": 16}),
    )
    assert weighted(again.scores["validation"], tasks) == resumed.best["objective"]
    assert resumed.best["objective"] == max(t[3] for t in trials_of(state))


@pytest.mark.slow
def test_on_ray_trials_match_and_are_logged_and_the_best_registered(
    write_spec, zoo_tiny, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from amalgam.registry import SEARCH_TAG, Registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    evaluate = {
        "tasks_dir": str(zoo_tiny.tasks_dir),
        "tasks": ["zoo_mulmod", "zoo_compare"],
        "engine": "quick",
        "limit": 16,
        "perplexity": False,
    }
    register = {"tracking_uri": uri, "model_name": "searched", "experiment": "search"}
    spec_file = write_spec({"register": register, "evaluate": evaluate}, generations=2)
    local = run_search(spec_file)
    spec = load_search_spec(spec_file).model_copy(
        update={"executor": "ray", "workers": 2, "state": str(tmp_path / "ray")}
    )
    on_ray = run_search(spec)
    assert trials_of(tmp_path / "ray") == trials_of(tmp_path / "state")
    assert len(set(_hosts(tmp_path / "ray"))) >= 2  # side by side in two worker processes
    assert outcome(on_ray.best) == outcome(local.best)

    client = MlflowClient(uri)
    children = client.search_runs(
        [client.get_run(on_ray.mlflow_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{on_ray.mlflow_run_id}'",
    )
    assert sorted(int(r.data.tags[SEARCH_TAG + ".trial"]) for r in children) == list(range(8))
    assert client.get_run(on_ray.mlflow_run_id).info.status == "FINISHED"
    registry = Registry(uri)
    assert registry.alias_version("searched", "candidate") == on_ray.registered["version"]


def _hosts(state: Path) -> list[str]:
    with (state / STATE_FILE).open("rb") as fh:
        return [t.host for t in pickle.load(fh).trials]
