"""nightly: the library's nightly run (:func:`amalgam.nightly.run_nightly`) as a flow.

No ``from __future__ import annotations`` here: ``amalgam serve`` loads this file by its
entrypoint and Prefect hands the flow to each run's process by value, where the annotations
must already be types (a string would name a class the pickled function cannot resolve).
"""

from prefect import flow

from amalgam.nightly import NightlyResult, run_nightly
from amalgam.pipeline_config import NightlyConfig
from amalgam_stage_tasks.stage import prefect_runner, publish


@flow(name="nightly")
def nightly(config: NightlyConfig | str) -> NightlyResult:
    """Find experts the champion has not absorbed, absorb them with the recipe's continual
    method, evaluate against the champion, register as candidate, and promote only when every
    gate passes (under the registry's lock, against the champion it was measured with).
    ``config``: a NightlyConfig, or the path of its file, read inside the run (as a parameter,
    a config's storage options are stored redacted)."""
    result = run_nightly(config, runner=prefect_runner)
    publish(result.report())
    return result
