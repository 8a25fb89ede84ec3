"""The one Prefect wrapper: a stage becomes a task named after it, cached by its key only when
the stage allows it, retrying storage errors only, publishing the stage's report."""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from amalgam.stages import MergeStage, ScoreStage, Stage, StageReport
from amalgam_stage_tasks.stage import as_task, prefect_runner, retry_storage_errors


def test_only_cacheable_stages_get_a_cache_key_and_every_stage_retries_storage_errors() -> None:
    score, merge = as_task(ScoreStage()), as_task(MergeStage())
    assert (score.name, merge.name) == ("score-model", "merge")
    assert score.cache_key_fn is not None and score.persist_result
    assert merge.cache_policy is NO_CACHE and merge.cache_key_fn is None
    for t in (score, merge):
        assert t.retries == 3 and t.retry_condition_fn is retry_storage_errors


class Doubling(Stage[int, int]):
    name = "doubling"

    def __init__(self) -> None:
        self.stored: dict[int, int] = {}

    def key(self, inp: int) -> str:
        return f"doubling-{inp}"

    def done(self, inp: int) -> int | None:
        return self.stored.get(inp)

    def run(self, inp: int) -> int:
        self.stored[inp] = 2 * inp
        return 2 * inp

    def report(self, inp: int, out: int) -> StageReport:
        return StageReport(
            markdown={"doubled": f"{inp} -> {out}"}, tables={"doublings": [{"in": inp}]}
        )


@pytest.mark.usefixtures("prefect_server")
def test_the_task_skips_by_done_and_publishes_the_report() -> None:
    stage = Doubling()

    @flow
    def twice() -> list[int]:
        return [prefect_runner(stage, 3), prefect_runner(stage, 3)]

    assert twice() == [6, 6]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["doubled", "doublings"]))
        )
    assert {a.key for a in found} == {"doubled", "doublings"}
    assert "3 -> 6" in {a.data for a in found if a.key == "doubled"}
