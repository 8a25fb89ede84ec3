"""search: the library's evolutionary recipe search (:func:`amalgam.search.evolve.run_search`)
as a flow; its candidates run as Ray tasks inside the library, the flow publishes the result."""

from __future__ import annotations

from prefect import flow

from amalgam.search.evolve import SearchResult, run_search
from amalgam_stage_tasks.stage import publish


@flow(name="search")
def search(spec: str) -> SearchResult:
    """CMA-ES over the spec's recipe (see ``docs/search.md``); resumes from the spec's state
    folder after a kill. ``spec``: the spec file's path (read inside the run)."""
    result = run_search(spec)
    publish(result.report())
    return result
