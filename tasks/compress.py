"""The compress task: ComPEFT-compress the merge when the recipe asks; skip what is done."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from amalgam.errors import AmalgamError
from amalgam.recipe import CompressSpec, Recipe
from tasks.merge import Merged
from tasks.retry import RETRIES


def already_compressed(uri: str, spec: CompressSpec, merged: Merged, storage_options: dict) -> bool:
    """``uri`` holds this merge compressed with these settings (by its manifest)."""
    from amalgam.compress.stage import read_manifest

    try:
        manifest = read_manifest(uri, **storage_options)
    except AmalgamError:
        return False
    settings = spec.model_dump(mode="json", exclude={"output", "max_shard_size"})
    return manifest["model"]["hash"] == merged.content_hash and manifest["settings"] == settings


@task(name="compress", cache_policy=NO_CACHE, **RETRIES)
def compress(recipe: Recipe, merged: Merged) -> dict:
    """Compress the merged model against the recipe's base; returns the size summary."""
    from amalgam.compress.stage import compress_model, read_manifest

    spec = recipe.compress
    if spec is None or recipe.base is None:
        raise AmalgamError("compress: the recipe needs a compress section and a base")
    out = spec.output or merged.output.rstrip("/") + "-compressed"
    if already_compressed(out, spec, merged, recipe.storage_options):
        get_run_logger().info("%s already holds this compression: skipped", out)
        manifest = read_manifest(out, **recipe.storage_options)
        return {"output": out, "skipped": True, "model_hash": manifest["model"]["hash"]}
    result = compress_model(
        merged.output,
        recipe.base,
        out,
        spec,
        overwrite=True,
        **recipe.storage_options,
    )
    summary = result.summary()
    create_markdown_artifact(
        key="compression",
        markdown=(
            f"### ComPEFT compression\n\n{summary['dense_bytes']:,} dense bytes -> "
            f"{summary['compressed_bytes']:,} bytes (x{summary['ratio']:.1f}); kept "
            f"{summary['kept']:,} of {summary['parameters']:,} parameters\n\n`{out}`"
        ),
    )
    return {**summary, "skipped": False}
