"""nightly: absorb new expert checkpoints into the champion, evaluate, register, maybe promote.

Idempotent by content: experts are recognised by content hash (the champion's continual state
lists those it absorbed), the candidate's folder is named by what goes into it, a finished
merge is never recomputed, and a model already registered is not registered again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from amalgam.checkpoint import open_checkpoint
from amalgam.engine import MergeOptions
from amalgam.engine.continual import absorbed_hashes
from amalgam.evaluate.forgetting import Forgetting
from amalgam.evaluate.report import REPORT_FILE, EvalReport
from amalgam.fetch import FetchedModel
from amalgam.pipeline_config import NightlyConfig, load_nightly_config
from amalgam.recipe import Recipe
from amalgam.registry import CHAMPION, PromotionRefused, Registry
from amalgam.stages import base, discover, evaluate, fetch, merge, register
from amalgam.storage import amalgam_home, join

log = logging.getLogger(__name__)


@dataclass
class NightlyResult:
    """What a nightly run did: ``status`` is nothing-new, promoted or held (a gate failed;
    ``failures`` names each)."""

    status: str
    message: str
    new: list[str] = field(default_factory=list)
    candidate: str | None = None
    version: str | None = None
    champion: str | None = None
    failures: list[str] = field(default_factory=list)
    forgetting: dict[str, Any] | None = None  # Forgetting.model_dump() of the candidate

    def as_dict(self) -> dict:
        return asdict(self)

    def report(self) -> base.StageReport:
        markdown = {"nightly": f"### nightly: {self.status}\n\n{self.message}"}
        if self.forgetting is not None:
            markdown["forgetting"] = forgetting_markdown(Forgetting.model_validate(self.forgetting))
        return base.StageReport(markdown=markdown)


def forgetting_markdown(found: Forgetting) -> str:
    """The candidate's forgetting per task and its BWT against the champion chain."""
    versions = ", ".join(s.version for s in found.history) or "none yet"
    lines = [
        "### Forgetting against the champion chain",
        "",
        f"Champions so far: {versions}. BWT: {_signed(found.bwt)}; max forgetting: "
        f"{_signed(found.max_forgetting)}; mean forgetting: {_signed(found.mean_forgetting)}.",
    ]
    if found.tasks:
        lines += ["", "| task | best (version) | now | forgetting |", "|---|---:|---:|---:|"]
        lines += [
            f"| {t} | {f.best:.4f} ({f.best_version}) | {f.now:.4f} | {f.forgetting:+.4f} |"
            for t, f in found.tasks.items()
        ]
    return "\n".join(lines)


def _signed(value: float | None) -> str:
    return "undefined" if value is None else f"{value:+.4f}"


@dataclass(frozen=True)
class Champion:
    """The registered champion a night starts from (all None before the first promotion)."""

    version: str | None = None
    uri: str | None = None
    content_hash: str | None = None
    absorbed: tuple[str, ...] = ()

    @classmethod
    def of(cls, registry: Registry, name: str) -> Champion:
        version = registry.alias_version(name, CHAMPION)
        if version is None:
            return cls()
        uri = registry.model_path(name, version)
        with open_checkpoint(uri) as ckpt:
            digest = ckpt.content_hash()
        return cls(version, uri, digest, tuple(absorbed_hashes(uri)))


def workdir(config: NightlyConfig) -> str:
    """Where candidates are merged: ``workdir`` (a path or a URI such as ``s3://...``, which
    a nightly on a Ray cluster of several nodes needs), else under ``$AMALGAM_HOME``."""
    return config.workdir or str(amalgam_home() / "nightly" / config.model_name)


def candidate_key(champion_hash: str | None, recipe_hash: str, new: list[FetchedModel]) -> str:
    """The candidate's folder name: a hash of everything that determines its bytes."""
    body = [champion_hash, recipe_hash, [m.content_hash for m in new]]
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16]


def new_experts(found: list[FetchedModel], champion: Champion) -> list[FetchedModel]:
    """What is new tonight: the experts the champion has not absorbed (by content hash)."""
    return [m for m in found if m.content_hash not in champion.absorbed]


def run_nightly(
    config: NightlyConfig | str | Path, runner: base.Runner = base.execute
) -> NightlyResult:
    """Find experts the champion has not absorbed, absorb them with the recipe's continual
    method, evaluate against the champion, register as candidate, and promote only when every
    gate of the registry's policy passes (under the registry's lock, against the champion it was
    measured with); the template recipe's gates only seed the policy of a new model."""
    config = config if isinstance(config, NightlyConfig) else load_nightly_config(config)
    name = config.model_name
    registry = register.registry_for(config.template.register)
    champion = Champion.of(registry, name)
    found = runner(
        discover.DiscoverStage(), discover.DiscoverInput(config.experts, config.expert_options)
    )
    new = new_experts(found, champion)
    if not new:
        return said(
            NightlyResult(
                "nothing-new",
                f"no new expert under {config.experts} ({len(found)} found, all absorbed into "
                f"champion version {champion.version or '(none)'}): nothing to do",
                champion=champion.version,
            )
        )
    labels = [m.label for m in new]
    recipe, inputs, merged = absorb(config, new, champion, runner)
    unchanged = refused_before(registry, name, merged, champion, labels)
    if unchanged is not None:
        return said(unchanged)
    job = evaluate.EvaluateInput(recipe, merged.output, champion.uri, champion.version)
    report = with_history(runner(evaluate.EvaluateStage(runner), job), registry, name, merged)
    extra = {"champion": (champion.uri, champion.content_hash)} if champion.uri else {}
    entry = register.RegisterInput(recipe, merged, inputs, report, extra_parents=extra)
    registered = runner(register.RegisterStage(), entry)
    result = promoted(registry, name, registered.version, report, labels, merged, champion)
    result.forgetting = report.forgetting.model_dump(mode="json") if report.forgetting else None
    return said(result)


def with_history(
    report: EvalReport, registry: Registry, name: str, merged: merge.Merged
) -> EvalReport:
    """The report with the candidate's forgetting and BWT against the champion chain read from
    the registry (:meth:`Registry.champion_history`), rewritten where the evaluate stage kept it."""
    report = report.with_history(registry.champion_history(name))
    path = evaluate.report_dir(merged.content_hash) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.model_dump_json(indent=1))
    return report


def absorb(
    config: NightlyConfig, new: list[FetchedModel], champion: Champion, runner: base.Runner
) -> tuple[Recipe, list[FetchedModel], merge.Merged]:
    """The new experts absorbed into the champion (or the base) in a folder named by what goes
    into it; returns the fetched recipe, its inputs and the merge."""
    recipe = config.recipe_for([{"uri": m.uri, "name": m.label} for m in new])
    output = join(workdir(config), candidate_key(champion.content_hash, recipe.hash(), new))
    fetched = runner(fetch.FetchStage(), fetch.FetchInput(recipe))
    options = MergeOptions(output=str(output), continue_from=champion.uri, executor=config.executor)
    options = fetched.merge_options(options)
    merged = runner(merge.MergeStage(), merge.MergeInput(fetched.recipe, options, fetched.models))
    return fetched.recipe, fetched.models, merged


def refused_before(
    registry: Registry, name: str, merged: merge.Merged, champion: Champion, labels: list[str]
) -> NightlyResult | None:
    """The result when this merge was registered and refused before, with the same champion
    and registry policy as now (nothing to do); None when it must be evaluated."""
    seen = registry.find_version(name, merged.content_hash)
    if seen is None:
        return None
    outcome = registry.promotion(seen.run_id)
    if outcome is None or outcome.outcome != "refused":
        return None
    policy = registry.policy(name)
    same_policy = outcome.policy == (policy.key if policy else None)
    if not same_policy or registry.alias_version(name, CHAMPION) != champion.version:
        return None
    return NightlyResult(
        "nothing-new",
        f"{', '.join(labels)} were already absorbed into version {seen.version}, which was not "
        f"promoted ({outcome.reason}) under the same champion and registry policy; "
        "nothing to do",
        labels,
        merged.output,
        seen.version,
        champion.version,
        outcome.reason.split("; "),
    )


def promoted(
    registry: Registry,
    name: str,
    version: str,
    report: EvalReport,
    labels: list[str],
    merged: merge.Merged,
    champion: Champion,
) -> NightlyResult:
    """Promote ``version`` if the registry's policy passes: promoted, held (a gate failed) or
    nothing-new (a concurrent run with the same experts promoted it first)."""
    absorbed = ", ".join(labels)
    try:
        result = registry.promote(name, version, report=report)
    except PromotionRefused as refused:
        return NightlyResult(
            "held",
            f"absorbed {absorbed} into version {version}, not promoted: "
            + "; ".join(refused.failures),
            labels,
            merged.output,
            version,
            champion.version,
            refused.failures,
        )
    if result.previous == result.version:
        return NightlyResult(
            "nothing-new",
            f"version {result.version} with {absorbed} is already champion "
            "(promoted by a concurrent run): nothing to do",
            labels,
            merged.output,
            result.version,
            result.version,
        )
    return NightlyResult(
        "promoted",
        f"absorbed {absorbed} into version {result.version}, now champion "
        f"(was {result.previous or 'none'})",
        labels,
        merged.output,
        result.version,
        result.version,
    )


def said(result: NightlyResult) -> NightlyResult:
    log.info("%s: %s", result.status, result.message)
    return result
