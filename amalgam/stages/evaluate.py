"""The evaluate stage: score candidate, base, experts and champion (each one a cached
:class:`ScoreStage` keyed by content), compare them, write the report.

A model's scores depend on its weights, the evaluation settings, the task data and the task
list, nothing else: :class:`ScoreStage` keys them so and keeps them under
``$AMALGAM_HOME/scores/<key>.json``, so base and experts are scored once across runs and
sweeps, with or without an orchestrator.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from amalgam.checkpoint import file_set_hash, open_checkpoint
from amalgam.compress.stage import decompress_model, read_manifest
from amalgam.engine.ray_executor import run_task
from amalgam.errors import RecipeError
from amalgam.evaluate.catalog import folder_task
from amalgam.evaluate.report import (
    EvalReport,
    evaluate_candidate,
    experts_for,
    spec_tasks,
    write_report,
)
from amalgam.evaluate.results import ModelResult
from amalgam.evaluate.score import score_model
from amalgam.recipe import EvaluateSpec, Recipe
from amalgam.stages.base import Runner, Stage, StageReport, content_key, execute
from amalgam.storage import amalgam_home, resolve

log = logging.getLogger(__name__)

#: Written last into a decompressed copy: the folder is complete.
DECOMPRESSED_FROM = "decompressed_from.txt"

#: What a model is scored on: URI -> (tasks, perplexity?).
Wanted = dict[str, tuple[list[str], bool]]


def spec_of(recipe: Recipe) -> EvaluateSpec:
    if recipe.evaluate is None:
        raise RecipeError("evaluate: the recipe has no evaluate section")
    return recipe.evaluate


def data_hash(spec: EvaluateSpec, tasks: list[str]) -> str:
    """sha256 over the task folders' files, the ``include_path`` folders' files, the task
    overrides and lm-eval's version: new examples or prompts mean new scores. (lm-eval's own
    tasks read their data from the datasets cache, which is not hashed.)"""
    folders = [t for t in tasks if folder_task(spec, t)]
    parts = []
    if folders:
        fs, root = resolve(spec.tasks_dir)
        files = sorted(
            str(Path(p).relative_to(root))
            for t in folders
            for p in fs.find(f"{root}/{t}")
            if fs.isfile(p)
        )
        parts.append(file_set_hash(fs, root, files))
    if len(folders) == len(tasks):
        return parts[0] if parts else content_key("data", [])
    for folder in spec.include_path:
        fs, root = resolve(folder)
        parts.append(
            file_set_hash(fs, root, sorted(str(Path(p).relative_to(root)) for p in fs.find(root)))
        )
    parts.append(json.dumps({"overrides": spec.task_overrides, "lm_eval": version("lm_eval")}))
    return content_key("data", parts)


def model_hash(uri: str, storage_options: dict[str, Any]) -> str:
    with open_checkpoint(uri, **storage_options) as ckpt:
        return ckpt.content_hash()


def report_dir(content_hash: str) -> Path:
    """Reports are kept by the candidate's content hash under ``$AMALGAM_HOME/reports``."""
    return amalgam_home() / "reports" / content_hash.removeprefix("sha256:")[:16]


def wanted(
    recipe: Recipe, spec: EvaluateSpec, champion: str | None, candidate: str | None
) -> Wanted:
    """URI -> (tasks, perplexity?) for every model a report needs: the candidate (if given),
    the base, each expert on its task, the champion."""
    tasks = spec_tasks(spec)
    ppl = spec.perplexity and recipe.base is not None
    out: Wanted = {}
    if candidate:
        out[candidate] = (tasks, ppl)
    if recipe.base:
        out[recipe.base] = (tasks, ppl)
    for task_name, uri in experts_for(recipe).items():
        on, p = out.get(uri, ([], False))
        out[uri] = (sorted({*on, task_name}), p)
    if champion:
        out[champion] = (tasks, out.get(champion, ([], False))[1])
    return out


def decompressed(recipe: Recipe, compressed: str) -> str:
    """A local dense copy of the ComPEFT folder ``compressed``, kept under
    ``$AMALGAM_HOME/decompressed`` by the hash of its manifest (rebuilt only when it changes);
    an MC-SMoE output is a model already, scored as it is, unless its experts were stored
    low-rank + sparse (``losparse_rank``: decompressed like ComPEFT, with no base)."""
    moe = recipe.compress is not None and recipe.compress.method == "mc_smoe"
    if moe and recipe.compress.losparse_rank is None:
        return compressed
    so = recipe.storage_options
    manifest = json.dumps(read_manifest(compressed, **so), sort_keys=True).encode()
    out = amalgam_home() / "decompressed" / hashlib.sha256(manifest).hexdigest()[:16]
    done = out / DECOMPRESSED_FROM
    if not done.is_file():
        base = None if moe else recipe.base
        decompress_model(compressed, base, str(out), overwrite=True, **so)
        done.write_text(compressed + "\n")
    return str(out)


@dataclass(frozen=True)
class ScoreInput:
    """One model to score; ``content_hash`` and ``data`` (the task data's hash) are measured
    by the caller, so that the key needs no read."""

    uri: str
    content_hash: str
    spec: EvaluateSpec
    tasks: list[str]
    perplexity: bool
    data: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    executor: str = "local"  # ray: scored as a Ray task, on a GPU node where there is one


class ScoreStage(Stage[ScoreInput, ModelResult]):
    """One model's per-example results, kept on disk by content key (``cache_dir``, default
    ``$AMALGAM_HOME/scores``); a cache file that does not read back is scored again."""

    name = "score-model"
    cacheable = True

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def key(self, inp: ScoreInput) -> str:
        body = {
            "model": inp.content_hash,
            "spec": inp.spec.model_dump(mode="json", exclude={"experts", "champion", "device"}),
            "data": inp.data,
            "tasks": inp.tasks,
            "perplexity": inp.perplexity,
        }  # storage options (credentials) and the URI never enter the key
        return content_key("score", body)

    def path(self, inp: ScoreInput) -> Path:
        return (self.cache_dir or amalgam_home() / "scores") / f"{self.key(inp)}.json"

    def done(self, inp: ScoreInput) -> ModelResult | None:
        try:
            cached = ModelResult.model_validate_json(self.path(inp).read_bytes())
        except (OSError, ValueError, ValidationError):
            return None  # none yet, or partial or corrupt: scored again
        return cached.model_copy(update={"uri": inp.uri})  # the same weights, maybe elsewhere

    def skip_reason(self, inp: ScoreInput, out: ModelResult) -> str:
        return f"{inp.uri} scores read from {self.path(inp)}"

    def run(self, inp: ScoreInput) -> ModelResult:
        args = (inp.uri, inp.spec, inp.tasks)
        kwargs = {"perplexity": inp.perplexity, **inp.storage_options}
        if inp.executor == "ray":
            gpu = inp.spec.device != "cpu"
            result = run_task(score_model, *args, gpu=gpu, what=f"scoring {inp.uri}", **kwargs)
        else:
            result = score_model(*args, **kwargs)
        write_atomically(self.path(inp), result.model_dump_json().encode())
        return result


def write_atomically(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` whole or is left as it was (a temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def score_all(recipe: Recipe, models: Wanted, runner: Runner = execute) -> dict[str, ModelResult]:
    """Score each model through ``runner`` (one at a time: each model already uses every
    core); results come from the score cache when the same content was scored before."""
    spec = spec_of(recipe)
    data = data_hash(spec, spec_tasks(spec))
    so = recipe.storage_options
    stage = ScoreStage()
    executor = recipe.executor or "local"
    return {
        uri: runner(stage, ScoreInput(uri, model_hash(uri, so), spec, on, p, data, so, executor))
        for uri, (on, p) in models.items()
    }


def compare(
    recipe: Recipe,
    candidate: str,
    champion: str | None,
    champion_version: str | None,
    precomputed: dict[str, ModelResult],
    compressed: ModelResult | None = None,
) -> EvalReport:
    """The candidate's report from scores (missing ones are measured), with the compressed
    copy's results when given, written to :func:`report_dir` of its content hash."""
    report = evaluate_candidate(
        candidate,
        spec_of(recipe),
        base_uri=recipe.base,
        experts=experts_for(recipe),
        champion_uri=champion,
        champion_version=champion_version,
        precomputed=precomputed,
        **recipe.storage_options,
    )
    if compressed is not None:
        report = report.model_copy(update={"compressed": compressed})
    write_report(report, report_dir(model_hash(candidate, recipe.storage_options)))
    return report


@dataclass(frozen=True)
class EvaluateInput:
    """Evaluate ``candidate`` as the recipe's ``evaluate`` section says, against ``champion``
    (default: the section's ``champion``), and the ``compressed`` copy of it when given."""

    recipe: Recipe
    candidate: str
    champion: str | None = None
    champion_version: str | None = None
    compressed: str | None = None

    @property
    def champion_uri(self) -> str | None:
        return self.champion or spec_of(self.recipe).champion


class EvaluateStage(Stage[EvaluateInput, EvalReport]):
    """Score every model the report needs through ``runner`` (each a :class:`ScoreStage`),
    compare, write the report and plots under :func:`report_dir`."""

    name = "evaluate"

    def __init__(self, runner: Runner = execute):
        self.runner = runner

    def key(self, inp: EvaluateInput) -> str:
        so = inp.recipe.storage_options
        body = {
            "candidate": model_hash(inp.candidate, so),
            "spec": spec_of(inp.recipe).model_dump(mode="json", exclude={"device"}),
            "experts": experts_for(inp.recipe),
            "base": inp.recipe.base,
            "champion": [inp.champion_uri, inp.champion_version],
            "compressed": inp.compressed,
        }
        return content_key(self.name, body)

    def run(self, inp: EvaluateInput) -> EvalReport:
        recipe, spec = inp.recipe, spec_of(inp.recipe)
        champion = inp.champion_uri
        models = wanted(recipe, spec, champion, inp.candidate)
        dense = decompressed(recipe, inp.compressed) if inp.compressed is not None else None
        if dense is not None:
            models[dense] = (spec_tasks(spec), False)
        scores = score_all(recipe, models, self.runner)
        packed = scores[dense] if dense is not None else None
        return compare(recipe, inp.candidate, champion, inp.champion_version, scores, packed)

    def report(self, inp: EvaluateInput, out: EvalReport) -> StageReport:
        folder = report_dir(model_hash(inp.candidate, inp.recipe.storage_options))
        return evaluation_report(out, folder)


def evaluation_report(report: EvalReport, folder: Path) -> StageReport:
    """A per-task table (``evaluation``) and a markdown summary (``evaluation-summary``)."""
    nfr = report.negative_flip_rates() or {}
    packed = report.metrics().get("compressed.mean_accuracy")
    table = [
        {
            "task": t,
            "accuracy": round(report.accuracy[t], 4),
            "normalized_accuracy": _round(report.normalized_accuracy.get(t)),
            "negative_flip_rate": _round(nfr.get(t)),
        }
        for t in report.tasks
    ]
    lines = [
        f"### Evaluation of `{report.candidate.uri}`",
        "",
        f"- mean accuracy: {report.mean_accuracy:.4f}",
        f"- mean normalized accuracy: {_round(report.mean_normalized_accuracy)}",
        f"- negative flip rate vs champion: {_round(report.negative_flip_rate)}",
        f"- perplexity ratio vs base: {_round(report.perplexity_ratio)}",
        f"- compressed copy, mean accuracy: {_round(packed)}",
        f"- report and plots: `{folder}`",
    ]
    return StageReport(
        markdown={"evaluation-summary": "\n".join(lines)},
        tables={"evaluation": table},
        description=f"Candidate {report.candidate.uri}",
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
