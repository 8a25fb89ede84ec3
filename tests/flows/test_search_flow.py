"""The search flow: a spec file in, the library's search run inside a Prefect flow run, its
result table published as an artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from recipes import TASKS, evaluate_section

from amalgam_flows.search import search

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.mark.slow
def test_the_search_flow_runs_the_spec_and_publishes_its_result(zoo_tiny, tmp_path: Path) -> None:
    recipe = {
        "method": "task_arithmetic",
        "base": str(zoo_tiny.base),
        "models": [{"uri": str(zoo_tiny.experts[t])} for t in TASKS],
        "evaluate": evaluate_section(zoo_tiny),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    spec = {
        "recipe": "recipe.yaml",
        "space": {"lambda": {"low": 0.1, "high": 1.0}},
        "objective": {"tasks": dict.fromkeys(TASKS, 1.0), "limit": 8, "heldout_limit": 8},
        "generations": 1,
        "population": 4,
        "executor": "local",
        "state": str(tmp_path / "state"),
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = search(str(tmp_path / "spec.yaml"))
    assert result.trials == 4 and Path(result.recipe_file).is_file()
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["search-result"]))
        )
    rows = json.loads(artifact.data)
    assert [r["candidate"] for r in rows] == ["start", "best"]
    assert rows[1]["objective.test"] == result.best_scores["objective"]["test"]
