"""The pipeline from a notebook: fetch -> merge -> compress -> evaluate -> register through the
library alone (no Prefect), with the flow's lineage, and every stage skipped on a re-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from stage_recipes import ta_recipe

from amalgam.registry import CONTENT_TAG, Registry

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TASKS = ["zoo_mulmod", "zoo_compare"]


@pytest.mark.slow
def test_notebook_pipeline_has_lineage_and_skips_every_stage_on_rerun(
    zoo_tiny, tmp_path: Path, tracking_uri: str
) -> None:
    recipe = ta_recipe(
        zoo_tiny,
        tmp_path / "merged",
        TASKS,
        compress={"density": 0.3, "output": str(tmp_path / "packed")},
        evaluate={
            "tasks_dir": str(zoo_tiny.tasks_dir),
            "tasks": TASKS,
            "limit": 24,
            "engine": "quick",
            "device": "cpu",
        },
        register={"tracking_uri": tracking_uri, "model_name": "nb", "gates": {}},
    )
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"recipe": recipe}))
    # a fresh process: this session's flow tests may have imported Prefect already
    env = {
        **os.environ,
        "AMALGAM_HOME": str(tmp_path / "home"),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    done = subprocess.run(
        [sys.executable, str(HERE / "notebook.py"), str(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert not out["prefect_imported"]
    first, second = out["first"], out["second"]

    # the lineage the flow test checks: parents' URIs and hashes, recipe, content, metrics
    assert not first["skipped_merge"] and first["registered"]["created"]
    registry = Registry(tracking_uri)
    version = first["registered"]["version"]
    assert registry.alias_version("nb", "candidate") == version
    lineage = registry.lineage("nb", version)
    assert {k: (p.uri, p.hash) for k, p in lineage.parents.items()} == {
        m["label"]: (m["uri"], m["content_hash"]) for m in first["inputs"]
    }
    assert lineage.recipe_hash == out["recipe_hash"]
    assert lineage.recipe["params"] == {"lambda": 0.5}
    assert lineage.merged_uri == str(tmp_path / "merged")
    assert lineage.tags[CONTENT_TAG] == first["content_hash"]
    assert registry.find_version("nb", first["content_hash"]).version == version
    assert lineage.metrics["mean_accuracy"] == pytest.approx(first["report"]["mean_accuracy"])
    assert "compressed.mean_accuracy" in lineage.metrics
    assert not first["compressed"]["skipped"]

    # the re-run: every stage skipped (scoring would have raised), the same version
    assert second["skipped_merge"] and second["compressed"]["skipped"]
    assert second["content_hash"] == first["content_hash"]
    assert second["report"] == first["report"]
    assert second["registered"] == {**first["registered"], "created": False}
    skipped = [m.split(" skipped: ")[0] for m in out["second_messages"] if " skipped: " in m]
    assert skipped == ["merge", "compress", *["score-model"] * 5, "register"]
    assert len(registry.client.search_model_versions("name = 'nb'")) == 1
    runs = registry.client.search_runs([registry.experiment_id("amalgam")])
    assert len(runs) == 1
