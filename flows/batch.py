"""batch: the library's batch (:func:`amalgam.batch.run_batch`) as a flow, so that a Prefect
deployment can run many recipes on one Ray cluster; the recipes' concurrency and retries are
the library's, on Ray."""

from __future__ import annotations

from prefect import flow

from amalgam.batch import run_batch
from amalgam_stage_tasks.stage import publish


@flow(name="batch")
def batch(
    recipes: list[str],
    address: str | None = None,
    concurrency: int = 4,
    retries: int = 2,
    gpus: float = 0,
    experiment: str = "amalgam-batch",
    tracking_uri: str | None = None,
) -> dict:
    """Every recipe file in ``recipes`` run on the Ray cluster at ``address`` (default:
    ``RAY_ADDRESS``, else a local Ray); the summary table as an artifact and in MLflow. The
    flow fails when any recipe failed, naming them."""
    result = run_batch(
        recipes,
        address=address,
        concurrency=concurrency,
        retries=retries,
        gpus=gpus,
        experiment=experiment,
        tracking_uri=tracking_uri,
    )
    publish(result.report())
    failed = [r.recipe for r in result.items if r.status == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(result.items)} recipes failed: {failed}")
    return result.as_dict()
