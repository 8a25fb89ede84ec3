"""The compress stage: ComPEFT-compress the merge (or MC-SMoE-merge an MoE's experts) when the
recipe asks; skip what is done."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from amalgam import storage
from amalgam.compress.stage import compress_model, read_manifest
from amalgam.errors import AmalgamError
from amalgam.fetch import FetchedModel
from amalgam.recipe import CompressSpec, Recipe
from amalgam.stages.base import Stage, StageReport, content_key
from amalgam.stages.merge import Merged
from amalgam.writer import intact, remove_leftovers


@dataclass(frozen=True)
class CompressInput:
    recipe: Recipe
    merged: Merged
    inputs: list[FetchedModel] = field(default_factory=list)  # for the base's content hash

    @property
    def spec(self) -> CompressSpec:
        spec = self.recipe.compress
        if spec is None or (spec.method == "compeft" and self.recipe.base is None):
            raise AmalgamError("compress: the recipe needs a compress section and a base")
        return spec

    @property
    def output(self) -> str:
        return self.spec.output or self.merged.output.rstrip("/") + "-compressed"


@dataclass(frozen=True)
class Compressed:
    """Where the compressed copy is and whether this run wrote it; ``details``: the size
    summary of :meth:`amalgam.compress.stage.CompressResult.summary` (a skip: ``model_hash``)."""

    output: str
    skipped: bool
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"output": self.output, **self.details, "skipped": self.skipped}


def settings(spec: CompressSpec) -> dict[str, Any]:
    """What decides the compressed bytes (not where they go or how they are sharded)."""
    return spec.settings()


def already_compressed(uri: str, spec: CompressSpec, merged: Merged, storage_options: dict) -> bool:
    """``uri`` holds this merge compressed with these settings (by its manifest)."""
    try:
        manifest = read_manifest(uri, **storage_options)
    except AmalgamError:
        return False
    same = manifest["model"]["hash"] == merged.content_hash and manifest["settings"] == settings(
        spec
    )
    if not same:
        return False
    fs, path = storage.resolve(uri, **storage_options)
    remove_leftovers(fs, path)  # a killed run's staging, also when this run skips
    return intact(fs, path)


class CompressStage(Stage[CompressInput, Compressed]):
    """Compress the merged model against the recipe's base."""

    name = "compress"

    def key(self, inp: CompressInput) -> str:
        base = next((m.content_hash for m in inp.inputs if m.label == "base"), None)
        body = [settings(inp.spec), inp.merged.content_hash, base or inp.recipe.base]
        return content_key(self.name, body)

    def done(self, inp: CompressInput) -> Compressed | None:
        so = inp.recipe.storage_options
        if inp.spec.method == "mc_smoe":
            # lazy: amalgam.compress.moe_compress imports amalgam.moe, whose build imports
            # amalgam.stages: a package-level cycle at import time
            from amalgam.compress.moe_compress import mc_smoe_done

            done = mc_smoe_done(inp.output, inp.spec, inp.merged.content_hash, so)
            return (
                Compressed(inp.output, True, {"model_hash": inp.merged.content_hash})
                if done
                else None
            )
        if not already_compressed(inp.output, inp.spec, inp.merged, so):
            return None
        manifest = read_manifest(inp.output, **so)
        return Compressed(inp.output, True, {"model_hash": manifest["model"]["hash"]})

    def skip_reason(self, inp: CompressInput, out: Compressed) -> str:
        return f"{out.output} already holds this compression"

    def run(self, inp: CompressInput) -> Compressed:
        so = inp.recipe.storage_options
        if inp.spec.method == "mc_smoe":
            # lazy: import cycle through amalgam.moe and amalgam.stages (see ``done``)
            from amalgam.compress.moe_compress import compress_moe

            moe = compress_moe(inp.merged.output, inp.output, inp.spec, overwrite=True, **so)
            summary = moe.summary()
            return Compressed(summary.pop("output"), moe.skipped, summary)
        result = compress_model(
            inp.merged.output, inp.recipe.base, inp.output, inp.spec, overwrite=True, **so
        )
        summary = result.summary()
        return Compressed(summary.pop("output"), False, summary)

    def report(self, inp: CompressInput, out: Compressed) -> StageReport | None:
        if out.skipped:
            return None
        d = out.details
        if inp.spec.method == "mc_smoe":
            return StageReport(
                markdown={
                    "compression": (
                        f"### MC-SMoE expert merging\n\n{d['experts']} experts per layer; "
                        f"{d['params_before']:,} -> {d['params_after']:,} parameters, "
                        f"{d['bytes_before']:,} -> {d['bytes_after']:,} bytes\n\n`{out.output}`"
                    )
                }
            )
        return StageReport(
            markdown={
                "compression": (
                    f"### ComPEFT compression\n\n{d['dense_bytes']:,} dense bytes -> "
                    f"{d['compressed_bytes']:,} bytes (x{d['ratio']:.1f}); kept "
                    f"{d['kept']:,} of {d['parameters']:,} parameters\n\n`{out.output}`"
                )
            }
        )
