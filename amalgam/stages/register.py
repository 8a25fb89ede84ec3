"""The register stage: one MLflow run per model content, a version, the ``candidate`` alias."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from amalgam.card import CardFacts, render_card, write_card
from amalgam.errors import RecipeError
from amalgam.evaluate.report import EvalReport
from amalgam.fetch import FetchedModel
from amalgam.recipe import Recipe, RegisterSpec, redact_uri
from amalgam.registry import (
    CANDIDATE,
    CHAMPION,
    Registered,
    Registry,
    StoreUnavailable,
    check_gates,
    recipe_record,
)
from amalgam.stages.base import Stage, content_key
from amalgam.stages.evaluate import report_dir
from amalgam.stages.merge import Merged

log = logging.getLogger(__name__)


def registry_for(spec: RegisterSpec) -> Registry:
    """The recipe's registry (the default store under ``$AMALGAM_HOME`` when it names none)."""
    return Registry(spec.tracking_uri)


@dataclass(frozen=True)
class RegisterInput:
    """Log the run (recipe, parents' URIs and hashes, metrics, report, model) of ``merged``;
    ``extra_parents`` (label -> (URI, hash)) adds lineage beyond the recipe's inputs (the
    champion a nightly merge continued)."""

    recipe: Recipe
    merged: Merged
    inputs: list[FetchedModel]
    report: EvalReport | None = None
    compressed: dict[str, Any] | None = None
    extra_parents: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def spec(self) -> RegisterSpec:
        if self.recipe.register is None:
            raise RecipeError("register: the recipe has no register section")
        return self.recipe.register


def card_text(registry: Registry, inp: RegisterInput, parents: dict[str, tuple[str, str]]) -> str:
    """The model card of ``inp``'s merge: its gates are the registry's policy for the name, or
    the recipe's while the registry has none (a new model's registration makes them its policy)."""
    policy = registry.policy(inp.spec.model_name)
    if policy is not None:
        gates, source = policy.gates, f"the registry's policy at registration ({policy.source})"
    else:
        gates, source = inp.spec.gates, "the recipe's gates (the registry has no policy for it yet)"
    facts = CardFacts(
        name=inp.spec.model_name,
        recipe=recipe_record(inp.recipe),
        content_hash=inp.merged.content_hash,
        parents=parents,
        report=inp.report,
        gates=gates,
        failures=check_gates(inp.report, gates) if inp.report else [],
        gates_source=source,
    )
    return render_card(facts)


class RegisterStage(Stage[RegisterInput, Registered]):
    """A model already registered under the name with the same content hash is not registered
    again: that version gets the ``candidate`` alias (unless it is champion). Lookup and
    registration hold the registry's lock, so two runs with one model register it once. Before
    the run is logged, a model card (``README.md``, :mod:`amalgam.card`) is written into the
    merged output, so the registered model carries it; the card is not part of the content
    hash."""

    name = "register"

    def key(self, inp: RegisterInput) -> str:
        return content_key(self.name, [inp.spec.model_name, inp.merged.content_hash])

    def done(self, inp: RegisterInput) -> Registered | None:
        registry = registry_for(inp.spec)
        with registry.lock(inp.spec.model_name):
            return self._existing(registry, inp)

    def skip_reason(self, inp: RegisterInput, out: Registered) -> str:
        return (
            f"{out.name} version {out.version} already holds this model "
            f"({inp.merged.content_hash}): not registered again"
        )

    def run(self, inp: RegisterInput) -> Registered:
        spec, registry, so = inp.spec, registry_for(inp.spec), inp.recipe.storage_options
        with registry.lock(spec.model_name):
            found = self._existing(registry, inp)  # registered meanwhile by a concurrent run
            if found is not None:
                log.info("register skipped: %s", self.skip_reason(inp, found))
                return found
            parents = {m.label: (m.uri, m.content_hash) for m in inp.inputs}
            parents |= dict(inp.extra_parents)
            write_card(inp.merged.output, card_text(registry, inp, parents), **so)
            files = sorted(report_dir(inp.merged.content_hash).glob("*")) if inp.report else []
            try:
                registered = registry.register_merge(
                    inp.recipe,
                    model_name=spec.model_name,
                    content_hash=inp.merged.content_hash,
                    parents=parents,
                    merged_uri=inp.merged.output,
                    report=inp.report,
                    artifacts=files,
                    compressed=inp.compressed,
                    experiment=spec.experiment,
                    storage_options=so,
                )
            except StoreUnavailable as exc:
                raise StoreUnavailable(
                    f"{exc}; nothing was registered, and the merged model "
                    f"{redact_uri(inp.merged.output)} is complete: run again once the store is "
                    "back (the merge is skipped)"
                ) from exc
        log.info(
            "registered %s version %s (run %s) as candidate",
            registered.name,
            registered.version,
            registered.run_id,
        )
        return registered

    @staticmethod
    def _existing(registry: Registry, inp: RegisterInput) -> Registered | None:
        name = inp.spec.model_name
        existing = registry.find_version(name, inp.merged.content_hash)
        if existing is not None and registry.alias_version(name, CHAMPION) != existing.version:
            registry.set_alias(name, CANDIDATE, existing.version)
        return existing
