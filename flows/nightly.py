"""nightly: the library's nightly run (:func:`amalgam.nightly.run_nightly`) as a flow."""

from __future__ import annotations

from prefect import flow

from amalgam.nightly import NightlyResult, run_nightly
from amalgam.pipeline_config import NightlyConfig
from tasks.stage import prefect_runner, publish


@flow(name="nightly")
def nightly(config: NightlyConfig | str) -> NightlyResult:
    """Find experts the champion has not absorbed, absorb them with the recipe's continual
    method, evaluate against the champion, register as candidate, and promote only when every
    gate passes (under the registry's lock, against the champion it was measured with)."""
    result = run_nightly(config, runner=prefect_runner)
    publish(result.report())
    return result
