"""The evaluation report: a candidate against its base, the experts and the champion.

``evaluate_candidate`` scores each model once (:mod:`amalgam.evaluate.score`) and derives
per-task and normalized accuracy, negative flips against the champion, the perplexity ratio
against the base, and the attack success rate on task folders that declare a backdoor.
``write_report`` writes ``report.json`` and PNG plots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from amalgam.evaluate import metrics as metric
from amalgam.evaluate.catalog import leaf_names
from amalgam.evaluate.embedding_tasks import is_embedding_task, list_embedding_tasks
from amalgam.evaluate.forgetting import ChampionStep, Forgetting, measure_forgetting
from amalgam.evaluate.plots import write_plots
from amalgam.evaluate.results import ModelResult
from amalgam.evaluate.score import score_model
from amalgam.evaluate.taskdir import EvaluationError, list_tasks

if TYPE_CHECKING:
    from amalgam.recipe import EvaluateSpec, Recipe

REPORT_FILE = "report.json"


class EvalReport(BaseModel):
    """Everything the register and promote stages need, per-example results included."""

    tasks: list[str]
    split: str
    limit: int | None
    engine: str
    candidate: ModelResult
    base: ModelResult | None = None
    experts: dict[str, ModelResult] = Field(default_factory=dict)  # task -> its expert
    champion: ModelResult | None = None
    champion_version: str | None = None
    accuracy: dict[str, float]
    mean_accuracy: float
    normalized_accuracy: dict[str, float | None]
    mean_normalized_accuracy: float | None
    flips: dict[str, metric.Flips] | None = None  # per task, against the champion
    negative_flip_rate: float | None = None  # pooled over every task's examples
    perplexity: float | None = None
    base_perplexity: float | None = None
    perplexity_ratio: float | None = None
    attack_success_rate: dict[str, float] = Field(default_factory=dict)  # backdoored tasks
    compressed: ModelResult | None = None  # the compress stage's copy, decompressed
    forgetting: Forgetting | None = None  # against the champion chain (nightly)

    def negative_flip_rates(self) -> dict[str, float] | None:
        if self.flips is None:
            return None
        return {task: f.negative_flip_rate for task, f in self.flips.items()}

    def metrics(self) -> dict[str, float]:
        """Flat name -> value for a tracking store (undefined values left out)."""
        out: dict[str, float | None] = {
            "mean_accuracy": self.mean_accuracy,
            "mean_normalized_accuracy": self.mean_normalized_accuracy,
            "negative_flip_rate": self.negative_flip_rate,
            "perplexity": self.perplexity,
            "perplexity_ratio": self.perplexity_ratio,
        }
        for task in self.tasks:
            out[f"accuracy.{task}"] = self.accuracy[task]
            out[f"normalized_accuracy.{task}"] = self.normalized_accuracy.get(task)
            if self.flips is not None and task in self.flips:
                out[f"negative_flip_rate.{task}"] = self.flips[task].negative_flip_rate
                out[f"positive_flip_rate.{task}"] = self.flips[task].positive_flip_rate
        out |= {f"attack_success_rate.{t}": v for t, v in self.attack_success_rate.items()}
        if self.compressed is not None:
            scores = [self.compressed.tasks[t].accuracy for t in self.tasks]
            out["compressed.mean_accuracy"] = sum(scores) / len(scores)
            out |= {f"compressed.accuracy.{t}": a for t, a in zip(self.tasks, scores, strict=True)}
        if self.forgetting is not None:
            out |= self.forgetting.metrics()
        return {k: float(v) for k, v in out.items() if v is not None}

    def with_history(self, history: Sequence[ChampionStep]) -> EvalReport:
        """A copy with the candidate's forgetting and BWT over the champion ``history``
        (:mod:`amalgam.evaluate.forgetting`)."""
        better = {t: self.candidate.tasks[t].higher_is_better for t in self.tasks}
        found = measure_forgetting(self.accuracy, history, better)
        return self.model_copy(update={"forgetting": found})

    @classmethod
    def read(cls, path: str | Path) -> EvalReport:
        return cls.model_validate_json(Path(path).read_text())


def spec_tasks(spec: EvaluateSpec) -> list[str]:
    """The tasks an EvaluateSpec names (each lm-eval group as its leaf tasks), or every task
    folder (lm-eval or embedding) under its ``tasks_dir``."""
    tasks_dir = Path(spec.tasks_dir) if spec.tasks_dir else None
    if not spec.tasks:
        if tasks_dir is None:
            raise EvaluationError("evaluate: name `tasks` or a `tasks_dir`")
        return sorted({*list_tasks(tasks_dir), *list_embedding_tasks(tasks_dir)})
    embedding = {t for t in spec.tasks if tasks_dir and is_embedding_task(tasks_dir, t)}
    others = [t for t in spec.tasks if t not in embedding]
    return [t for t in spec.tasks if t in embedding] + (leaf_names(spec, others) if others else [])


def experts_for(recipe: Recipe) -> dict[str, str]:
    """Task -> expert URI for a recipe with an ``evaluate`` section: its ``experts`` mapping
    (values are model labels or URIs), else every recipe model whose label is a task name."""
    spec = recipe.evaluate
    if spec is None:
        raise EvaluationError("evaluate: the recipe has no evaluate section")
    by_label = {m.label: m.uri for m in recipe.models}
    if spec.experts is not None:
        return {task: by_label.get(ref, ref) for task, ref in spec.experts.items()}
    return {task: by_label[task] for task in spec_tasks(spec) if task in by_label}


def evaluate_candidate(
    candidate_uri: str,
    spec: EvaluateSpec,
    *,
    base_uri: str | None = None,
    experts: Mapping[str, str] | None = None,
    champion_uri: str | None = None,
    champion_version: str | None = None,
    precomputed: Mapping[str, ModelResult] | None = None,
    **storage_options: Any,
) -> EvalReport:
    """Evaluate ``candidate_uri`` on the tasks of ``spec`` (an EvaluateSpec).

    ``experts`` maps a task to the model fine-tuned for it (normalized accuracy on that task);
    ``champion_uri`` is the model the candidate would replace (negative flips), and
    ``champion_version`` its registry version, recorded so that promotion can check the
    champion has not moved since. ``precomputed`` maps URIs to results already measured with
    the same spec (a cache: base and experts rarely change between runs). Remote models
    (``s3://...`` with ``storage_options``) are copied to a temporary folder to be run.
    """
    tasks = spec_tasks(spec)
    experts = dict(experts or {})
    unknown = sorted(set(experts) - set(tasks))
    if unknown:
        raise EvaluationError(f"experts: no task named {', '.join(unknown)} among {tasks}")
    cache = dict(precomputed or {})
    want_ppl = spec.perplexity and base_uri is not None

    def run(uri: str, on: list[str], ppl: bool) -> ModelResult:
        hit = cache.get(uri)
        if hit is not None and set(on) <= set(hit.tasks) and (not ppl or hit.nll is not None):
            return ModelResult(
                uri=uri,
                tasks={t: hit.tasks[t] for t in on},
                nll=hit.nll,
                tokens=hit.tokens,
                attack_success={t: a for t, a in hit.attack_success.items() if t in on},
            )
        return score_model(uri, spec, on, perplexity=ppl, **storage_options)

    candidate = run(candidate_uri, tasks, want_ppl)
    base = run(base_uri, tasks, want_ppl) if base_uri else None
    expert_results = {task: run(uri, [task], False) for task, uri in experts.items()}
    champion = run(champion_uri, tasks, False) if champion_uri else None

    return build_report(
        tasks,
        candidate,
        base=base,
        experts=expert_results,
        champion=champion,
        champion_version=champion_version,
        split=spec.split,
        limit=spec.limit,
        engine=spec.engine,
    )


def build_report(
    tasks: list[str],
    candidate: ModelResult,
    *,
    base: ModelResult | None = None,
    experts: Mapping[str, ModelResult] | None = None,
    champion: ModelResult | None = None,
    champion_version: str | None = None,
    split: str = "test",
    limit: int | None = None,
    engine: str = "quick",
) -> EvalReport:
    """Derive every metric from the models' per-example results (no model is run).

    The perplexity ratio needs both candidate and base log-likelihoods, over the same tokens.
    """
    experts = dict(experts or {})
    acc = {t: candidate.tasks[t].accuracy for t in tasks}
    normalized = {
        t: metric.normalized_accuracy(
            acc[t], experts[t].tasks[t].accuracy, candidate.tasks[t].higher_is_better
        )
        if t in experts
        else None
        for t in tasks
    }
    report = EvalReport(
        tasks=tasks,
        split=split,
        limit=limit,
        engine=engine,
        candidate=candidate,
        base=base,
        experts=experts,
        champion=champion,
        champion_version=champion_version,
        accuracy=acc,
        mean_accuracy=sum(acc.values()) / len(acc),
        normalized_accuracy=normalized,
        mean_normalized_accuracy=metric.mean_defined(normalized.values()),
        attack_success_rate=dict(candidate.attack_success),
    )
    if champion is not None:
        report.flips = {
            t: metric.flips(champion.tasks[t].correct, candidate.tasks[t].correct, t)
            for t in tasks
            if candidate.tasks[t].correct
        }
        if report.flips:
            report.negative_flip_rate = metric.pooled_negative_flip_rate(report.flips)
    if base is not None and candidate.nll is not None and base.nll is not None:
        if candidate.tokens != base.tokens:
            raise EvaluationError(
                f"perplexity: {candidate.uri} and {base.uri} tokenize the task texts into "
                f"{candidate.tokens} and {base.tokens} tokens; the ratio needs one tokenizer"
            )
        report.perplexity, report.base_perplexity = candidate.perplexity, base.perplexity
        report.perplexity_ratio = metric.perplexity_ratio(report.perplexity, report.base_perplexity)
    return report


def write_report(report: EvalReport, out_dir: str | Path) -> list[Path]:
    """Write ``report.json`` and the PNG plots into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_FILE
    path.write_text(report.model_dump_json(indent=1))
    return [path, *write_plots(report, out)]
