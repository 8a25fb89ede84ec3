"""The compress stage: ComPEFT-compress the merge, store the recipe's experts as TALL masks, or
MC-SMoE-merge an MoE's experts, when the recipe asks; skip what is done."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from amalgam import storage
from amalgam.compress.stage import compress_model, read_manifest
from amalgam.compress.tall import compress_tall
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

    @property
    def sources(self) -> dict[str, str]:
        """Content hashes of what is compressed: the merge (``model``), or for TALL each
        expert's, by its label."""
        if self.spec.method != "tall":
            return {"model": self.merged.content_hash}
        hashes = {m.label: m.content_hash for m in self.inputs}
        missing = [m.label for m in self.recipe.models if m.label not in hashes]
        if missing:
            raise AmalgamError(f"compress: no content hash for the experts {missing}")
        return {m.label: hashes[m.label] for m in self.recipe.models}

    @property
    def experts(self) -> dict[str, str]:
        """Label -> URI of the recipe's models: the tasks of TALL storage."""
        return {m.label: m.uri for m in self.recipe.models}


@dataclass(frozen=True)
class Compressed:
    """Where the compressed copy is and whether this run wrote it; ``details``: the size
    summary of :meth:`amalgam.compress.stage.CompressResult.summary` (a skip: ``model_hash``)."""

    output: str
    skipped: bool
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"output": self.output, **self.details, "skipped": self.skipped}


def sources(manifest: dict[str, Any]) -> dict[str, str]:
    """Content hashes a compressed folder was made from (see :attr:`CompressInput.sources`)."""
    if manifest["method"] == "tall":
        return {task: entry["hash"] for task, entry in manifest["tasks"].items()}
    return {"model": manifest["model"]["hash"]}


def already_compressed(
    uri: str, spec: CompressSpec, made_from: dict[str, str], storage_options: dict
) -> bool:
    """``uri`` holds ``made_from`` (content hashes, see :func:`sources`) compressed with these
    settings (by its manifest)."""
    try:
        manifest = read_manifest(uri, **storage_options)
    except AmalgamError:
        return False
    if sources(manifest) != made_from or manifest["settings"] != spec.settings():
        return False
    fs, path = storage.resolve(uri, **storage_options)
    remove_leftovers(fs, path)  # a killed run's staging, also when this run skips
    return intact(fs, path)


class CompressStage(Stage[CompressInput, Compressed]):
    """Compress the merged model against the recipe's base."""

    name = "compress"

    def key(self, inp: CompressInput) -> str:
        base = next((m.content_hash for m in inp.inputs if m.label == "base"), None)
        body = [inp.spec.settings(), inp.merged.content_hash, base or inp.recipe.base]
        if inp.spec.method == "tall":  # the experts, whatever the merge
            body = [inp.spec.settings(), inp.sources, base or inp.recipe.base]
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
        if not already_compressed(inp.output, inp.spec, inp.sources, so):
            return None
        if inp.spec.method == "tall":
            return Compressed(inp.output, True, {"tasks": list(inp.sources)})
        return Compressed(inp.output, True, {"model_hash": inp.merged.content_hash})

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
        if inp.spec.method == "tall":
            result = compress_tall(
                inp.experts, inp.recipe.base, inp.output, inp.spec, overwrite=True, **so
            )
        else:
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
            text = (
                f"### MC-SMoE expert merging\n\n{d['experts']} experts per layer; "
                f"{d['params_before']:,} -> {d['params_after']:,} parameters, "
                f"{d['bytes_before']:,} -> {d['bytes_after']:,} bytes"
            )
        elif inp.spec.method == "tall":
            text = (
                f"### TALL-mask storage of {len(inp.recipe.models)} experts\n\n"
                f"{d['dense_bytes']:,} bytes of experts -> {d['compressed_bytes']:,} bytes "
                f"(x{d['ratio']:.1f}) of multi-task vector and masks, over the base"
            )
        else:
            text = (
                f"### ComPEFT compression\n\n{d['dense_bytes']:,} dense bytes -> "
                f"{d['compressed_bytes']:,} bytes (x{d['ratio']:.1f}); kept "
                f"{d['kept']:,} of {d['parameters']:,} parameters"
            )
        return StageReport(markdown={"compression": f"{text}\n\n`{out.output}`"})
