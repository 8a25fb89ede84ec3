"""The evaluate task: score candidate, base, experts and champion (each cached by content hash),
compare them, write the report, and publish it as Prefect artifacts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from amalgam.checkpoint import file_set_hash, open_checkpoint
from amalgam.errors import RecipeError
from amalgam.recipe import EvaluateSpec, Recipe
from amalgam.storage import amalgam_home, resolve
from tasks.retry import RETRIES

if TYPE_CHECKING:
    from amalgam.evaluate.report import EvalReport, ModelResult

#: Written last into a decompressed copy: the folder is complete.
DECOMPRESSED_FROM = "decompressed_from.txt"


def tasks_of(spec: EvaluateSpec) -> list[str]:
    from amalgam.evaluate.report import spec_tasks

    return spec_tasks(spec)


def experts_of(recipe: Recipe) -> dict[str, str]:
    """Task -> expert URI: the section's ``experts``, else the recipe's models named by task."""
    from amalgam.evaluate.report import experts_for

    return experts_for(recipe)


def data_hash(spec: EvaluateSpec, tasks: list[str]) -> str:
    """sha256 over the task folders' files: new examples mean new scores."""
    fs, root = resolve(spec.tasks_dir)
    files = sorted(
        str(Path(p).relative_to(root))
        for t in tasks
        for p in fs.find(f"{root}/{t}")
        if fs.isfile(p)
    )
    return file_set_hash(fs, root, files)


def score_key(context: Any, parameters: dict[str, Any]) -> str:
    """A model's scores depend on its weights (content hash), the evaluation settings, the task
    data and the task list: nothing else, so its URI is not part of the key."""
    spec: EvaluateSpec = parameters["spec"]
    body = {
        "model": parameters["content_hash"],
        "spec": spec.model_dump(mode="json", exclude={"experts", "champion", "device"}),
        "data": parameters["data"],
        "tasks": parameters["tasks"],
        "perplexity": parameters["perplexity"],
    }  # storage options (credentials) never enter the key
    return "score-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@task(name="score-model", cache_key_fn=score_key, persist_result=True, **RETRIES)
def score(
    uri: str,
    content_hash: str,
    spec: EvaluateSpec,
    tasks: list[str],
    perplexity: bool,
    data: str,
    storage_options: dict,
) -> ModelResult:
    """One model's per-example results; cached across runs by content hash."""
    from amalgam.evaluate.report import score_model

    return score_model(uri, spec, tasks, perplexity=perplexity, **storage_options)


def model_hash(uri: str, storage_options: dict) -> str:
    with open_checkpoint(uri, **storage_options) as ckpt:
        return ckpt.content_hash()


def wanted(
    recipe: Recipe, spec: EvaluateSpec, champion: str | None, candidate: str | None
) -> dict[str, tuple[list[str], bool]]:
    """URI -> (tasks, perplexity?) for every model a report needs: the candidate (if given),
    the base, each expert on its task, the champion."""
    tasks = tasks_of(spec)
    ppl = spec.perplexity and recipe.base is not None
    out: dict[str, tuple[list[str], bool]] = {}
    if candidate:
        out[candidate] = (tasks, ppl)
    if recipe.base:
        out[recipe.base] = (tasks, ppl)
    for task_name, uri in experts_of(recipe).items():
        on, p = out.get(uri, ([], False))
        out[uri] = (sorted({*on, task_name}), p)
    if champion:
        out[champion] = (tasks, out.get(champion, ([], False))[1])
    return out


def score_all(recipe: Recipe, models: dict[str, tuple[list[str], bool]]) -> dict[str, ModelResult]:
    """Score each model with the cached ``score`` task, one at a time (each model already
    uses every core)."""
    spec = spec_of(recipe)
    data = data_hash(spec, tasks_of(spec))
    so = recipe.storage_options
    return {
        uri: score(uri, model_hash(uri, so), spec, on, p, data, so)
        for uri, (on, p) in models.items()
    }


def spec_of(recipe: Recipe) -> EvaluateSpec:
    if recipe.evaluate is None:
        raise RecipeError("evaluate: the recipe has no evaluate section")
    return recipe.evaluate


def compare(
    recipe: Recipe,
    candidate: str,
    champion: str | None,
    champion_version: str | None,
    precomputed: dict[str, ModelResult],
    compressed: ModelResult | None = None,
) -> tuple[EvalReport, Path]:
    """The candidate's report from scores (missing ones are measured), with the compressed
    copy's results when given, written to its folder."""
    from amalgam.evaluate.report import evaluate_candidate, write_report

    spec = spec_of(recipe)
    report = evaluate_candidate(
        candidate,
        spec,
        base_uri=recipe.base,
        experts=experts_of(recipe),
        champion_uri=champion,
        champion_version=champion_version,
        precomputed=precomputed,
        **recipe.storage_options,
    )
    if compressed is not None:
        report = report.model_copy(update={"compressed": compressed})
    out = report_dir(model_hash(candidate, recipe.storage_options))
    write_report(report, out)
    return report, out


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(
    recipe: Recipe,
    candidate: str,
    champion: str | None = None,
    champion_version: str | None = None,
    compressed: str | None = None,
) -> EvalReport:
    """Evaluate ``candidate`` as the recipe's ``evaluate`` section says, against its base, the
    experts it names and ``champion`` (default: the section's ``champion``), and the
    ``compressed`` copy of it when given; publishes the report as Prefect artifacts."""
    spec = spec_of(recipe)
    champion = champion or spec.champion
    models = wanted(recipe, spec, champion, candidate)
    dense = decompressed(recipe, compressed) if compressed is not None else None
    if dense is not None:
        models[dense] = (tasks_of(spec), False)
    scores = score_all(recipe, models)
    packed = scores[dense] if dense is not None else None
    report, out = compare(recipe, candidate, champion, champion_version, scores, packed)
    publish(report, out)
    return report


def decompressed(recipe: Recipe, compressed: str) -> str:
    """A local dense copy of the ComPEFT folder ``compressed``, kept under
    ``$AMALGAM_HOME/decompressed`` by the hash of its manifest (rebuilt only when it changes)."""
    from amalgam.compress.stage import decompress_model, read_manifest

    so = recipe.storage_options
    manifest = json.dumps(read_manifest(compressed, **so), sort_keys=True).encode()
    out = amalgam_home() / "decompressed" / hashlib.sha256(manifest).hexdigest()[:16]
    done = out / DECOMPRESSED_FROM
    if not done.is_file():
        decompress_model(compressed, recipe.base, str(out), overwrite=True, **so)
        done.write_text(compressed + "\n")
    return str(out)


def report_dir(content_hash: str) -> Path:
    """Reports are kept by the candidate's content hash under ``$AMALGAM_HOME/reports``."""
    return amalgam_home() / "reports" / content_hash.removeprefix("sha256:")[:16]


def publish(report: EvalReport, out: Path) -> None:
    """The report as Prefect artifacts: a per-task table and a markdown summary."""
    nfr = report.negative_flip_rates() or {}
    packed = report.metrics().get("compressed.mean_accuracy")
    create_table_artifact(
        key="evaluation",
        table=[
            {
                "task": t,
                "accuracy": round(report.accuracy[t], 4),
                "normalized_accuracy": _round(report.normalized_accuracy.get(t)),
                "negative_flip_rate": _round(nfr.get(t)),
            }
            for t in report.tasks
        ],
        description=f"Candidate {report.candidate.uri}",
    )
    lines = [
        f"### Evaluation of `{report.candidate.uri}`",
        "",
        f"- mean accuracy: {report.mean_accuracy:.4f}",
        f"- mean normalized accuracy: {_round(report.mean_normalized_accuracy)}",
        f"- negative flip rate vs champion: {_round(report.negative_flip_rate)}",
        f"- perplexity ratio vs base: {_round(report.perplexity_ratio)}",
        f"- compressed copy, mean accuracy: {_round(packed)}",
        f"- report and plots: `{out}`",
    ]
    create_markdown_artifact(key="evaluation-summary", markdown="\n".join(lines))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
