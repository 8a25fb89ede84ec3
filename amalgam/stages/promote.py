"""The promote stage: check a version against the registry's policy and move ``champion``, or
say why not."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from amalgam.registry import PromotionRefused, Registry
from amalgam.stages.base import Runner, Stage, StageReport, content_key, execute

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromoteInput:
    name: str
    version: str  # a version number or an alias
    tracking_uri: str | None = None


@dataclass(frozen=True)
class Promoted:
    """The outcome: ``version`` is champion (``previous`` held it), or ``failures`` names
    every gate that refused it."""

    name: str
    version: str
    previous: str | None = None
    failures: list[str] = field(default_factory=list)

    def raise_refusal(self) -> None:
        """Raise :class:`PromotionRefused` when the gates refused the version."""
        if self.failures:
            raise PromotionRefused(self.name, self.version, self.failures)

    def as_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "previous": self.previous}


class PromoteStage(Stage[PromoteInput, Promoted]):
    """Promote under the registry's lock (a refusal is recorded on the version's run); a
    refusal is an outcome here, raised by the caller after it is reported."""

    name = "promote"

    def key(self, inp: PromoteInput) -> str:
        return content_key(self.name, [inp.tracking_uri, inp.name, inp.version])

    def run(self, inp: PromoteInput) -> Promoted:
        registry = Registry(inp.tracking_uri)
        try:
            result = registry.promote(inp.name, inp.version)
        except PromotionRefused as refused:
            return Promoted(inp.name, refused.version, failures=refused.failures)
        return Promoted(inp.name, result.version, result.previous)

    def report(self, inp: PromoteInput, out: Promoted) -> StageReport:
        if out.failures:
            text = f"### {out.name} version {out.version} not promoted\n\n" + "\n".join(
                f"- {f}" for f in out.failures
            )
        else:
            text = (
                f"### {out.name} version {out.version} is champion (was {out.previous or 'none'})"
            )
        return StageReport(markdown={"promotion": text})


def run_promote(
    name: str, version: str, tracking_uri: str | None = None, runner: Runner = execute
) -> Promoted:
    """Check ``name`` ``version`` against the gates of the registry's policy for ``name`` (not
    its recipe's) and make it champion, or raise :class:`PromotionRefused` naming every failing
    gate (after ``runner`` reported it)."""
    out = runner(PromoteStage(), PromoteInput(name, version, tracking_uri))
    out.raise_refusal()
    log.info("%s: champion %s -> %s", name, out.previous or "none", out.version)
    return out
