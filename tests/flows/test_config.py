"""Flow configs, the deployment file and the retry rule: checked without running a flow."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from amalgam.errors import CheckpointError, RecipeError
from amalgam.pipeline_config import Grid, load_grid, load_nightly_config
from amalgam.registry import StoreUnavailable
from amalgam.search.spec import load_search_spec, prepare
from amalgam_stage_tasks.stage import is_transient
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[2]


def test_prefect_yaml_deploys_the_flows_with_a_nightly_cron() -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import Flow

    spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {"nightly", "merge-pipeline", "batch", "search", "promote"}
    for deployment in spec["deployments"]:
        path, func = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, func), Flow)
    (schedule,) = by_name["nightly"]["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises when invalid
    assert (REPO / by_name["nightly"]["parameters"]["config"]).is_file()


def test_example_configs_load(monkeypatch, zoo_tiny) -> None:
    monkeypatch.setenv("ZOO", str(zoo_tiny.root))
    config = load_nightly_config(REPO / "configs" / "nightly.yaml")
    assert config.template.method_spec.continual
    assert config.model_name == "zoo-nightly"
    points = load_grid(REPO / "configs" / "sweep.yaml").points()
    assert len(points) == 3 + 4 + 1
    search = prepare(load_search_spec(REPO / "configs" / "search.yaml"))
    assert len(search.space.coordinates) == 2 * 8  # weight and density of each expert


def test_nightly_config_needs_register_and_a_known_field(tmp_path: Path, zoo_tiny) -> None:
    recipe = {"method": "continual_ta", "base": str(zoo_tiny.base)}
    path = tmp_path / "n.yaml"
    path.write_text(yaml.safe_dump({"experts": "x", "recipe": recipe}))
    with pytest.raises(RecipeError, match=r"recipe\.register"):
        load_nightly_config(path)
    path.write_text(yaml.safe_dump({"experts": "x", "recipe": recipe, "shedule": "daily"}))
    with pytest.raises(RecipeError, match="shedule: Extra inputs are not permitted"):
        load_nightly_config(path)


def test_grid_crosses_each_methods_values() -> None:
    grid = Grid.model_validate({"methods": {"ties": {"density": [0.2, 0.5], "lambda": [1.0]}}})
    assert [p.label for p in grid.points()] == [
        "ties(density=0.2,lambda=1.0)",
        "ties(density=0.5,lambda=1.0)",
    ]


def test_retries_storage_failures_not_bad_input() -> None:
    try:
        raise CheckpointError("s3://b/m: cannot read") from ConnectionResetError("reset")
    except CheckpointError as exc:
        assert is_transient(exc)
    assert not is_transient(CheckpointError("m: no such checkpoint"))
    assert not is_transient(FileNotFoundError("m"))
    assert is_transient(TimeoutError("read timed out"))
    # a tracking store's failure: MLflow's client retried it already
    try:
        raise StoreUnavailable("MLflow store http://x failed") from ConnectionRefusedError()
    except StoreUnavailable as exc:
        assert not is_transient(exc)


def test_cli_refuses_bad_files_before_starting_prefect(tmp_path: Path, monkeypatch, capsys) -> None:
    bad = tmp_path / "recipe.yaml"
    bad.write_text(yaml.safe_dump({"method": "nope", "models": [{"uri": "x"}]}))
    for args in (["run", str(bad)], ["nightly", str(bad)], ["sweep", str(bad), "--grid", str(bad)]):
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert code == 2
        assert err.startswith("error: ") and str(bad) in err


def test_compose_stack_publishes_on_loopback_only() -> None:
    stack = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    assert {"s3", "mlflow", "prefect", "postgres"} <= set(stack["services"])
    ports = [p for s in stack["services"].values() for p in s.get("ports", [])]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports)
    mlflow = stack["services"]["mlflow"]["command"]
    assert "mlflow server" in mlflow and "postgresql://" in mlflow and "s3://" in mlflow
