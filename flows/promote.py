"""promote: check a version against the registry's policy and move the ``champion`` alias, or
refuse naming the gate."""

from __future__ import annotations

from prefect import flow

from amalgam.stages import run_promote
from amalgam_stage_tasks.stage import prefect_runner


@flow(name="promote")
def promote(name: str, version: str | int, tracking_uri: str | None = None) -> dict:
    """Check ``name`` ``version`` against the registry's policy and make it champion, or raise
    :class:`amalgam.registry.PromotionRefused` naming every failing gate (the refusal is
    recorded on the version's run and as a Prefect artifact). ``version`` may be a number:
    ``prefect deployment run promote/promote --param version=3`` passes one."""
    return run_promote(name, str(version), tracking_uri, runner=prefect_runner).as_dict()
