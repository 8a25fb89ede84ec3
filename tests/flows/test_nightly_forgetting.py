"""nightly: forgetting and BWT against the champion chain, from the registry, in MLflow and in
the gates (three real nightly flow runs as experts arrive, then a gate that refuses)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from statistics import mean

import pytest
from huggingface_hub import ModelCard
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from recipes import nightly_config

from amalgam.pipeline_config import NightlyConfig
from amalgam.recipe import Gates
from amalgam.registry import Registry
from amalgam_flows.nightly import nightly

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

NIGHTS = ["zoo_mulmod", "zoo_compare", "zoo_count"]  # one expert arrives each night


def run_of(client: MlflowClient, version: str):
    return client.get_run(client.get_model_version("zoo", version).run_id)


def scores(run) -> dict[str, float]:
    return {t: run.data.metrics[f"accuracy.{t}"] for t in NIGHTS}


def by_hand(now: dict[str, float], earlier: list[dict[str, float]]) -> tuple[dict, float | None]:
    """Forgetting per task (best earlier champion minus now) and BWT (now minus the score of
    the champion that absorbed the task, night i absorbing NIGHTS[i])."""
    if not earlier:
        return {}, None
    forgetting = {t: max(e[t] for e in earlier) - now[t] for t in now}
    return forgetting, mean(now[t] - earlier[i][t] for i, t in enumerate(NIGHTS[: len(earlier)]))


def forgetting_reports() -> dict[str, str]:
    """Artifact id -> text of every Prefect "forgetting" artifact on the server (the session's
    other nightly runs write them too)."""
    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["forgetting"]))
        )
    return {str(a.id): a.data for a in found}


def test_nightly_forgetting_over_three_nights_and_its_gate(
    zoo_tiny, tmp_path: Path, tracking_uri: str
) -> None:
    drop = tmp_path / "drop"
    raw = nightly_config(zoo_tiny, str(drop), tracking_uri, tmp_path / "work")
    raw["recipe"]["evaluate"]["tasks"] = NIGHTS
    raw["recipe"]["evaluate"]["limit"] = 16
    raw["recipe"]["evaluate"]["perplexity"] = False
    config = NightlyConfig.model_validate(raw)
    registry = Registry(tracking_uri)
    registry.set_policy("zoo", Gates(task_floor=0.0, floor_metric="accuracy"))
    client = MlflowClient(tracking_uri)

    earlier_reports = forgetting_reports()
    champions: list[dict[str, float]] = []
    shown: list[str] = []  # lines the nights' forgetting reports must hold
    for night, expert in enumerate(NIGHTS):
        shutil.copytree(zoo_tiny.experts[expert], drop / expert)
        result = nightly(config)
        assert result.status == "promoted", result.message
        run = run_of(client, result.version)
        now = scores(run)
        forgetting, bwt = by_hand(now, champions)
        logged = run.data.metrics
        assert {k.removeprefix("forgetting.") for k in logged if k.startswith("forgetting.")} == (
            set(forgetting)
        )
        for task, value in forgetting.items():
            assert logged[f"forgetting.{task}"] == pytest.approx(value, abs=1e-12)
            assert result.forgetting["tasks"][task]["forgetting"] == pytest.approx(value)
        if night == 0:  # first night: no history, nothing to forget, BWT undefined
            assert result.forgetting["history"] == [] and result.forgetting["bwt"] is None
            assert "bwt" not in logged and "max_forgetting" not in logged
        else:
            assert logged["bwt"] == pytest.approx(bwt, abs=1e-12)
            assert logged["max_forgetting"] == pytest.approx(max(forgetting.values()))
            assert logged["mean_forgetting"] == pytest.approx(mean(forgetting.values()))
            assert result.forgetting["absorbed_at"] == {
                t: str(i + 1) for i, t in enumerate(NIGHTS[:night])
            }
        history = json.loads(registry.run_text(run.info.run_id, "report/champion_history.json"))
        column = history["columns"].index("version")
        assert [row[column] for row in history["data"]] == [str(v + 1) for v in range(night)]
        assert json.loads(run.data.tags["amalgam.expert_tasks"]) == [expert]
        if night:  # the flow's markdown artifact and the model card show the same figures
            shown.append(f"BWT: {bwt:+.4f}; max forgetting: {max(forgetting.values()):+.4f}")
            shown += [
                f"| {t} | {max(c[t] for c in champions):.4f} ("
                f"{1 + max(range(night), key=lambda i, t=t: (champions[i][t], -i))}) | "
                f"{now[t]:.4f} | {f:+.4f} |"
                for t, f in forgetting.items()
            ]
            card = ModelCard.load(Path(registry.model_path("zoo", result.version)) / "README.md")
            assert f"- backward transfer (BWT): {bwt:.4f}" in card.text
            assert f"| champion (version {night}) |" in card.text
        champions.append(now)
    texts = [t for i, t in forgetting_reports().items() if i not in earlier_reports]
    assert len(texts) == 3 and "Champions so far: none yet. BWT: undefined" in "".join(texts)
    for line in shown:
        assert any(line in text for text in texts), line

    # a fourth expert arrives under a policy that lets no task lose ground to the chain
    assert max(forgetting.values()) > 0, "the tiny zoo's chain should forget some task"
    registry.set_policy("zoo", Gates(max_forgetting=0.0))
    shutil.copytree(zoo_tiny.experts["zoo_sort"], drop / "zoo_sort")
    held = nightly(config)
    assert held.status == "held", held.message
    now = scores(run_of(client, held.version))
    forgetting, _ = by_hand(now, champions)
    expected = []
    for task, value in forgetting.items():
        if value > 0:
            best = max(range(3), key=lambda i, t=task: (champions[i][t], -i))
            expected.append(
                f"max_forgetting: task {task} forgetting {value:.4f} > 0.0 (best "
                f"{champions[best][task]:.4f} in champion version {best + 1}, now "
                f"{now[task]:.4f}) (registry policy)"
            )
    assert held.failures == expected
    assert registry.alias_version("zoo", "champion") == "3"
