"""The stage contract: typed input and output, a content key, a check of the store, a run.

A stage is the unit the pipeline sequences and an orchestrator wraps. ``key(inp)`` names the
work by content (the recipe section and the inputs' content hashes; never storage options or
URIs where content decides); ``done(inp)`` reads the store (provenance, manifest, score cache,
registry) and returns the finished output, or None when there is work to do; ``run(inp)`` does
it. :func:`execute` is the library's skip/resume rule; an orchestrator runs the same stage
through its own runner (see ``tasks/stage.py`` for Prefect).
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageReport:
    """A result for people: markdown texts and tables by key (an orchestrator publishes them,
    Prefect as artifacts under these keys; a notebook can print them)."""

    markdown: dict[str, str] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    description: str | None = None  # of the tables


def content_key(kind: str, body: Any) -> str:
    """``<kind>-<sha256 of body's canonical JSON>``: equal work, equal key."""
    text = json.dumps(body, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()}"


class Stage(ABC, Generic[In, Out]):
    """One pipeline stage. Subclasses set ``name`` and implement ``key`` and ``run``; those
    whose output can be found in the store implement ``done``."""

    name: str
    #: An orchestrator may cache the output by ``key`` and skip ``done``: only for pure
    #: functions of content (scoring a model). Stages whose output lives in a store that can
    #: change (a merge folder, a registry) leave it False: ``done`` must read the real store.
    cacheable: bool = False

    @abstractmethod
    def key(self, inp: In) -> str:
        """The content key of the work ``inp`` asks for."""

    def done(self, inp: In) -> Out | None:
        """The output when the store already holds it, else None (work needed)."""
        return None

    @abstractmethod
    def run(self, inp: In) -> Out:
        """Do the work (a stage whose output another process may write meanwhile re-checks
        the store when it finds its output taken)."""

    def skip_reason(self, inp: In, out: Out) -> str:
        """Why ``done`` found the work done, for the log."""
        return "already done"

    def report(self, inp: In, out: Out) -> StageReport | None:
        """What an orchestrator publishes about ``out`` (None: nothing)."""
        return None


#: Runs one stage on one input: :func:`execute`, or an orchestrator's wrapper around it.
Runner = Callable[[Stage[Any, Any], Any], Any]
#: Runs one stage on many inputs, possibly side by side; results in input order.
Mapper = Callable[[Stage[Any, Any], Sequence[Any]], list[Any]]


def execute(stage: Stage[In, Out], inp: In, *, logger: Any = log) -> Out:
    """The skip/resume rule: the stored output when ``stage.done`` finds it, else a run."""
    found = stage.done(inp)
    if found is not None:
        logger.info("%s skipped: %s", stage.name, stage.skip_reason(inp, found))
        return found
    return stage.run(inp)


def in_order(runner: Runner) -> Mapper:
    """A mapper that runs each input through ``runner``, one after another."""

    def run_each(stage: Stage[Any, Any], inputs: Sequence[Any]) -> list[Any]:
        return [runner(stage, inp) for inp in inputs]

    return run_each
