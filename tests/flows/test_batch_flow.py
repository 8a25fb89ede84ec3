"""The batch flow on a real Ray: a recipe with evaluate and register sections runs its whole
pipeline (its candidate registered), a recipe with a missing input fails the flow run and
not the other recipe; the summary table is a Prefect artifact and an MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from recipes import evaluate_section, register_section

from amalgam.registry import CONTENT_TAG, Registry
from amalgam_flows.batch import batch

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.mark.slow
def test_the_batch_flow_runs_whole_pipelines_and_fails_for_a_failed_recipe(
    zoo_tiny, tmp_path: Path, tracking_uri: str
) -> None:
    body = {
        "method": "task_arithmetic",
        "base": str(zoo_tiny.base),
        "models": [{"uri": str(zoo_tiny.experts[e])} for e in ("zoo_mulmod", "zoo_compare")],
        "dtype": "float32",
        "output": str(tmp_path / "merged"),
        "evaluate": evaluate_section(zoo_tiny, perplexity=False),
        "register": register_section(tracking_uri, "batch"),
    }
    full = tmp_path / "full.yaml"
    full.write_text(yaml.safe_dump(body))
    missing = tmp_path / "missing.yaml"
    body["models"][0]["uri"] = str(tmp_path / "no-such-model")
    missing.write_text(yaml.safe_dump({**body, "output": str(tmp_path / "other")}))

    state = batch([str(full), str(missing)], tracking_uri=tracking_uri, return_state=True)

    assert state.is_failed() and str(missing) in state.message
    registry = Registry(tracking_uri)
    version = registry.alias_version("batch", "candidate")
    assert version is not None
    lineage = registry.lineage("batch", version)
    assert lineage.merged_uri == str(tmp_path / "merged")
    (run,) = registry.client.search_runs(
        [registry.experiment_id("amalgam-batch")], "tags.`amalgam.batch` = 'true'"
    )
    table = json.loads(registry.run_text(run.info.run_id, "batch.json"))
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [r["status"] for r in rows] == ["ok", "failed"]
    candidate = registry.client.get_run(lineage.run_id)
    assert candidate.data.tags[CONTENT_TAG] == rows[0]["content_hash"]
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["batch"]))
        )
    assert [r["status"] for r in json.loads(artifact.data)] == ["ok", "failed"]
