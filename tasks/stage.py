"""The one Prefect wrapper: any library stage (:mod:`amalgam.stages`) as a Prefect task.

A stage's task is named after the stage, retries storage and network failures only (bad input
fails at once with its typed error), is cached by the stage's content key only when the stage
says its output is a pure function of content (``cacheable``; the others' ``done`` reads the
real store on every run), and publishes the stage's report as Prefect artifacts. The
library's log records inside a run go to that run's logs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

from amalgam.recipe import redact_uri, redact_uris
from amalgam.stages import Stage, StageReport, execute
from amalgam.transient import RETRY_DELAYS, is_transient


def retry_storage_errors(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry storage failures, fail bad input at once."""
    try:
        state.result()
    except BaseException as exc:
        return is_transient(exc)
    return False


RETRIES = {
    "retries": 3,
    "retry_delay_seconds": list(RETRY_DELAYS),
    "retry_condition_fn": retry_storage_errors,
}


class _RedactUris(logging.Filter):
    """A log record's message with the passwords in its URIs redacted, for every handler after
    this one (the run's logs in Prefect, the console)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_uri(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


class _RunLogs(APILogHandler):
    """The library's log records, sent to the logs of the flow or task run they happen in."""

    def emit(self, record: logging.LogRecord) -> None:
        if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
            super().emit(record)


def _library_logs() -> None:
    library = logging.getLogger("amalgam")
    if not any(isinstance(h, _RunLogs) for h in library.handlers):
        handler = _RunLogs()
        handler.addFilter(_RedactUris())
        library.addHandler(handler)
    if library.level == logging.NOTSET:
        library.setLevel(logging.INFO)


_library_logs()


def publish(report: StageReport | None) -> None:
    """A stage report as Prefect artifacts: each markdown text and table under its key, with
    the passwords in its URIs redacted."""
    if report is None:
        return
    for key, rows in report.tables.items():
        create_table_artifact(
            key=key, table=redact_uris(rows), description=redact_uri(report.description)
        )
    for key, text in report.markdown.items():
        create_markdown_artifact(key=key, markdown=redact_uri(text))


def _stage_key(context: Any, parameters: dict[str, Any]) -> str:
    return parameters["stage"].key(parameters["inp"])


def redact_error(exc: BaseException) -> None:
    """Passwords in the URIs an error names, redacted in place: Prefect stores a failed run's
    error in its state and logs, and the command line prints it."""

    def redact(value: Any) -> Any:
        return redact_uri(value) if isinstance(value, str) else value

    exc.args = tuple(map(redact, exc.args))
    if isinstance(exc, OSError):
        exc.filename, exc.filename2 = redact(exc.filename), redact(exc.filename2)


def _run(stage: Stage[Any, Any], inp: Any) -> Any:
    try:
        out = execute(stage, inp)
    except Exception as exc:
        redact_error(exc)
        raise
    publish(stage.report(inp, out))
    return out


def as_task(stage: Stage[Any, Any]) -> Any:
    """The Prefect task that runs ``stage`` (call it with ``(stage, inp)``, or ``.submit``)."""
    if stage.cacheable:
        caching: dict[str, Any] = {"cache_key_fn": _stage_key, "persist_result": True}
    else:
        caching = {"cache_policy": NO_CACHE}
    return task(name=stage.name, **caching, **RETRIES)(_run)


def prefect_runner(stage: Stage[Any, Any], inp: Any) -> Any:
    """A library runner (:data:`amalgam.stages.Runner`): the stage as a Prefect task."""
    return as_task(stage)(stage, inp)


def prefect_mapper(stage: Stage[Any, Any], inputs: Sequence[Any]) -> list[Any]:
    """A library mapper: every input submitted to the flow's task runner, side by side."""
    futures = [as_task(stage).submit(stage, inp) for inp in inputs]
    return [f.result() for f in futures]
