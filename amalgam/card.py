"""A Hugging Face model card (``README.md``) for a merged model: what went in, how it was merged,
how it scores against its base, experts and champion, and which promotion gates it passes.

The layout follows the cards mergekit writes, so Hub users find the same things in the same
places: YAML front matter with a ``base_model`` list and ``merge`` tags, then ``Merge Details``
with ``Merge Method``, ``Models Merged`` and ``Configuration``. The evaluation is also in the
front matter as a ``model-index`` (the Hub's evaluation-results format).

The card is not part of the model's identity: the content hash covers the weight files only
(:meth:`amalgam.checkpoint.Checkpoint.content_hash`) and the commit record lists what the merge
wrote, so writing or rewriting ``README.md`` after the commit changes neither, and an output
with a card still reads as intact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from amalgam import __version__, storage
from amalgam.evaluate.table import render_markdown
from amalgam.recipe import redact_uri, redact_uris

if TYPE_CHECKING:
    from amalgam.evaluate.report import EvalReport
    from amalgam.recipe import Gates
    from amalgam.registry import Registry

CARD_FILE = "README.md"


@dataclass(frozen=True)
class CardFacts:
    """Everything a card says. ``recipe`` is the recipe as recorded (no storage options);
    ``parents`` maps each input's label to (URI, content hash); ``failures`` are the failed
    gates of ``gates`` (from :func:`amalgam.registry.check_gates`), whose origin is
    ``gates_source``."""

    name: str
    recipe: Mapping[str, Any]
    content_hash: str
    parents: Mapping[str, tuple[str, str]]
    report: EvalReport | None = None
    gates: Gates | None = None
    failures: Sequence[str] = field(default_factory=list)
    gates_source: str = ""


def render_card(facts: CardFacts) -> str:
    """The card's text: YAML front matter, then the markdown body."""
    recipe = redact_uris(dict(facts.recipe))
    parents = {label: (redact_uri(u) or "", h) for label, (u, h) in facts.parents.items()}
    base = recipe.get("base")
    front: dict[str, Any] = {
        "base_model": [*([base] if base else []), *(u for u, _ in parents.values() if u != base)],
        "library_name": "transformers",
        "tags": ["merge", "amalgam", recipe["method"]],
    }
    if facts.report is not None:
        front["model-index"] = model_index(facts.name, facts.report)
    body = [
        f"# {facts.name}",
        "",
        f"A merge of pre-trained models made with amalgam {__version__}, content hash "
        f"`{facts.content_hash}`.",
        "",
        *merge_details(recipe, parents),
        *evaluation(facts.report),
        *gate_lines(facts),
    ]
    head = yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
    return f"---\n{head}---\n\n" + "\n".join(body).rstrip() + "\n"


def merge_details(recipe: dict[str, Any], parents: Mapping[str, tuple[str, str]]) -> list[str]:
    method, base = recipe["method"], recipe.get("base")
    on_base = f", over the base model `{base}`" if base else " (no base model)"
    params = ", ".join(f"`{k}={v}`" for k, v in recipe.get("params", {}).items())
    lines = [
        "## Merge Details",
        "",
        "### Merge Method",
        "",
        f"Merged with `{method}`{on_base}" + (f"; parameters {params}." if params else "."),
        "",
        "### Models Merged",
        "",
        "| label | model | content hash |",
        "|---|---|---|",
        *(f"| {label} | `{uri}` | `{h}` |" for label, (uri, h) in parents.items()),
        "",
        "### Configuration",
        "",
        "The amalgam recipe that made this model (storage options left out):",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=True).rstrip(),
        "```",
        "",
    ]
    return lines


def score_rows(report: EvalReport) -> dict[str, dict[str, float]]:
    """Table rows: this model, the base, each expert on its own task, the champion, and the
    compressed copy (score per task, as fractions)."""
    rows = {"this model": dict(report.accuracy)}
    if report.base is not None:
        rows["base"] = {t: r.accuracy for t, r in report.base.tasks.items()}
    for task, expert in report.experts.items():
        rows[f"expert for {task}"] = {task: expert.tasks[task].accuracy}
    if report.champion is not None:
        label = f"champion (version {report.champion_version})" if report.champion_version else ""
        rows[label or "champion"] = {t: r.accuracy for t, r in report.champion.tasks.items()}
    if report.compressed is not None:
        rows["compressed copy"] = {t: r.accuracy for t, r in report.compressed.tasks.items()}
    return rows


def evaluation(report: EvalReport | None) -> list[str]:
    if report is None:
        return ["## Evaluation", "", "Not evaluated (the recipe has no evaluate section).", ""]
    metrics = sorted({report.candidate.tasks[t].metric for t in report.tasks})
    lines = [
        "## Evaluation",
        "",
        f"Primary score per task ({', '.join(metrics)}, in %), split `{report.split}`, "
        f"engine `{report.engine}`"
        + (f", first {report.limit} examples" if report.limit else "")
        + ":",
        "",
        render_markdown(score_rows(report), report.tasks),
    ]
    figures = {
        "mean normalized accuracy": report.mean_normalized_accuracy,
        "negative flip rate vs champion": report.negative_flip_rate,
        "perplexity ratio vs base": report.perplexity_ratio,
    }
    if report.forgetting is not None:
        figures |= {
            "max forgetting vs earlier champions": report.forgetting.max_forgetting,
            "backward transfer (BWT)": report.forgetting.bwt,
        }
    lines += [f"- {k}: {v:.4f}" for k, v in figures.items() if v is not None]
    return [*lines, ""]


def gate_lines(facts: CardFacts) -> list[str]:
    lines = ["## Promotion Gates", ""]
    if facts.gates is None or facts.report is None:
        return [*lines, "Not checked (no evaluation or no gates)."]
    checked = facts.gates.model_dump(exclude_none=True, exclude={"floor_metric"})
    if not checked:
        return [*lines, f"No gate is set ({facts.gates_source})."]
    lines += [f"Checked against {facts.gates_source}:", ""]
    for gate, bound in checked.items():
        failed = [f for f in facts.failures if f.startswith(f"{gate}:")]
        lines.append(
            f"- `{gate}` {bound}: " + ("failed: " + "; ".join(failed) if failed else "passed")
        )
    return lines


def model_index(name: str, report: EvalReport) -> list[dict[str, Any]]:
    """The Hub's ``model-index``: one result per task, its primary score as a fraction."""
    results = [
        {
            "task": {"type": "text-generation"},
            "dataset": {"name": task, "type": task, "split": report.split},
            "metrics": [
                {
                    "type": report.candidate.tasks[task].metric,
                    "value": round(report.accuracy[task], 6),
                    "name": f"{task} {report.candidate.tasks[task].metric}",
                }
            ],
        }
        for task in report.tasks
    ]
    return [{"name": name, "results": results}]


def write_card(folder: str, text: str, **storage_options: Any) -> str:
    """Write ``text`` as ``README.md`` into the model folder ``folder`` (any store); returns
    its path."""
    fs, root = storage.resolve(folder, **storage_options)
    path = storage.join(root, CARD_FILE)
    with storage.store_errors(path):
        fs.pipe_file(path, text.encode())
    return path


def registered_card(registry: Registry, name: str, version: str) -> tuple[str, str | None]:
    """The card of a registered version (a number or an alias) from what its run recorded
    (recipe, parents, content hash, report), its gates checked now against the registry's
    policy; and the merged output the run recorded (None if none)."""
    from amalgam.registry import CONTENT_TAG, check_gates  # lazy: mlflow

    lineage = registry.lineage(name, version)
    report = registry.report(lineage.run_id)
    policy = registry.policy(name)
    facts = CardFacts(
        name=name,
        recipe=lineage.recipe,
        content_hash=lineage.tags.get(CONTENT_TAG, ""),
        parents={label: (p.uri, p.hash) for label, p in lineage.parents.items()},
        report=report,
        gates=policy.gates if policy else None,
        failures=check_gates(report, policy.gates) if report and policy else [],
        gates_source=f"the registry's policy now ({policy.source})" if policy else "",
    )
    return render_card(facts), lineage.merged_uri
