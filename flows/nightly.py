"""nightly: absorb new expert checkpoints into the champion, evaluate, register, maybe promote.

Idempotent by content: experts are recognised by content hash (the champion's continual state
lists those it absorbed), the candidate's folder is named by what goes into it, a finished
merge is never recomputed, and a model already registered is not registered again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from amalgam.checkpoint import open_checkpoint
from amalgam.engine import MergeOptions
from amalgam.fetch import FetchedModel, fetch_model
from amalgam.storage import amalgam_home
from flows.config import NightlyConfig, load_nightly_config
from tasks.evaluate import evaluate
from tasks.fetch import fetch
from tasks.merge import merge
from tasks.register import find_version, register, registry_for
from tasks.retry import RETRIES


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

    def as_dict(self) -> dict:
        return asdict(self)


@task(name="discover", cache_policy=NO_CACHE, **RETRIES)
def discover(config: NightlyConfig) -> list[FetchedModel]:
    """Every checkpoint under the experts prefix, verified and hashed (one per content)."""
    from amalgam.discover import discover_checkpoints

    found, seen = [], set()
    for name, uri in discover_checkpoints(config.experts, **config.expert_options):
        model = fetch_model(name, uri, **config.expert_options)
        if model.content_hash not in seen:
            seen.add(model.content_hash)
            found.append(model)
    return found


def workdir(config: NightlyConfig) -> Path:
    return Path(config.workdir or amalgam_home() / "nightly" / config.model_name)


def candidate_key(champion_hash: str | None, recipe_hash: str, new: list[FetchedModel]) -> str:
    """The candidate's folder name: a hash of everything that determines its bytes."""
    body = [champion_hash, recipe_hash, [m.content_hash for m in new]]
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16]


def say(result: NightlyResult) -> NightlyResult:
    get_run_logger().info("%s: %s", result.status, result.message)
    create_markdown_artifact(
        key="nightly", markdown=f"### nightly: {result.status}\n\n{result.message}"
    )
    return result


@flow(name="nightly")
def nightly(config: NightlyConfig | str) -> NightlyResult:
    """Find experts the champion has not absorbed, absorb them with the recipe's continual
    method, evaluate against the champion, register as candidate, and promote only when every
    gate passes (under the registry's lock, against the champion it was measured with)."""
    from amalgam.engine.continual import absorbed_hashes
    from amalgam.registry import PromotionRefused

    config = config if isinstance(config, NightlyConfig) else load_nightly_config(config)
    template = config.template
    name = config.model_name
    spec = template.register
    registry = registry_for(spec)
    champion_version = registry.alias_version(name, "champion")
    champion_uri = champion_hash = None
    absorbed: list[str] = []
    if champion_version is not None:
        champion_uri = registry.model_path(name, champion_version)
        absorbed = absorbed_hashes(champion_uri)
        with open_checkpoint(champion_uri) as ckpt:
            champion_hash = ckpt.content_hash()
    found = discover(config)
    new = [m for m in found if m.content_hash not in absorbed]
    if not new:
        return say(
            NightlyResult(
                "nothing-new",
                f"no new expert under {config.experts} ({len(found)} found, all absorbed into "
                f"champion version {champion_version or '(none)'}): nothing to do",
                champion=champion_version,
            )
        )
    recipe = config.recipe_for([{"uri": m.uri, "name": m.label} for m in new])
    output = workdir(config) / candidate_key(champion_hash, recipe.hash(), new)
    recipe, inputs = fetch(recipe)
    options = MergeOptions(output=str(output), continue_from=champion_uri, executor=config.executor)
    merged = merge(recipe, options, inputs)
    labels = [m.label for m in new]
    seen = find_version(registry, name, merged.content_hash)
    if seen is not None:
        outcome = registry.client.get_run(seen.run_id).data.tags.get("amalgam.promotion")
        if outcome == "refused" and registry.alias_version(name, "champion") == champion_version:
            reason = registry.client.get_run(seen.run_id).data.tags["amalgam.promotion.reason"]
            return say(
                NightlyResult(
                    "nothing-new",
                    f"{', '.join(labels)} were already absorbed into version {seen.version}, "
                    f"which was not promoted ({reason}); nothing to do",
                    labels,
                    merged.output,
                    seen.version,
                    champion_version,
                    reason.split("; "),
                )
            )
    report = evaluate(recipe, merged.output, champion_uri, champion_version)
    extra = {"champion": (champion_uri, champion_hash)} if champion_uri else {}
    registered = register(recipe, merged, inputs, report, extra_parents=extra)
    try:
        result = registry.promote(name, registered.version, spec.gates, report=report)
    except PromotionRefused as refused:
        return say(
            NightlyResult(
                "held",
                f"absorbed {', '.join(labels)} into version {registered.version}, not promoted: "
                + "; ".join(refused.failures),
                labels,
                merged.output,
                registered.version,
                champion_version,
                refused.failures,
            )
        )
    if result.previous == result.version:  # a concurrent run with the same experts promoted it
        return say(
            NightlyResult(
                "nothing-new",
                f"version {result.version} with {', '.join(labels)} is already champion "
                "(promoted by a concurrent run): nothing to do",
                labels,
                merged.output,
                result.version,
                result.version,
            )
        )
    return say(
        NightlyResult(
            "promoted",
            f"absorbed {', '.join(labels)} into version {result.version}, now champion "
            f"(was {result.previous or 'none'})",
            labels,
            merged.output,
            result.version,
            result.version,
        )
    )
