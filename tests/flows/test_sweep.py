"""sweep on a real Ray: every grid point merged and evaluated, leaderboard in MLflow, best
registered as candidate; the flow leaves the process's one Ray running for the next run."""

from __future__ import annotations

import pytest
from recipes import evaluate_section, register_section

from amalgam.pipeline_config import Grid
from amalgam.recipe import parse_recipe
from amalgam.registry import Registry
from amalgam_flows.sweep import run_sweep

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.mark.slow
def test_sweep_on_ray_ranks_and_registers_the_best(zoo_tiny, tracking_uri: str) -> None:
    import ray

    experts = ["zoo_count", "zoo_compare"]
    recipe = parse_recipe(
        {
            "method": "task_arithmetic",
            "base": str(zoo_tiny.base),
            "models": [{"uri": str(zoo_tiny.experts[e])} for e in experts],
            "dtype": "float32",
            "evaluate": evaluate_section(zoo_tiny, perplexity=False),
            "register": register_section(tracking_uri, "sweep"),
        }
    )
    grid = Grid.model_validate(
        {"methods": {"task_arithmetic": {"lambda": [0.0, 1.0]}, "linear": {}}}
    )
    result = run_sweep(recipe, grid, "ray")
    address = ray.get_runtime_context().gcs_address
    assert ray.is_initialized()  # not shut down by the flow: the next run reuses it

    board = result.leaderboard
    assert len(board) == 3
    scores = [row["mean_accuracy"] for row in board]
    assert scores == sorted(scores, reverse=True)
    # lambda 0 is the base itself: its accuracy is the base's, measured independently here
    from amalgam.evaluate.score import score_model

    base = score_model(str(zoo_tiny.base), recipe.evaluate, recipe.evaluate.tasks)
    zero = next(r for r in board if r["params"] == '{"lambda": 0.0}')
    expected = sum(t.accuracy for t in base.tasks.values()) / len(base.tasks)
    assert zero["mean_accuracy"] == pytest.approx(expected)

    registry = Registry(tracking_uri)
    version = registry.alias_version("sweep", "candidate")
    assert version == result.registered["version"]
    assert registry.lineage("sweep", version).merged_uri == board[0]["output"]
    run = registry.client.get_run(result.mlflow_run_id)
    assert run.data.params["best"] == board[0]["candidate"]
    assert "leaderboard.json" in [a.path for a in registry.client.list_artifacts(run.info.run_id)]
    assert ray.get_runtime_context().gcs_address == address
