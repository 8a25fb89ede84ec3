"""The evaluate stage on the tiny zoo: per-example results, report, plots, lm-eval agreement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amalgam.evaluate import EvaluationError, quick_evaluate
from amalgam.evaluate.harness import evaluate_model, evaluate_model_samples
from amalgam.evaluate.perplexity import task_texts
from amalgam.evaluate.quick import choice_correct
from amalgam.evaluate.report import (
    EvalReport,
    evaluate_candidate,
    experts_for,
    write_report,
)
from amalgam.evaluate.taskdir import read_split
from amalgam.recipe import EvaluateSpec, parse_recipe
from amalgam.zoo import Zoo

LIMIT = 16


def spec(zoo: Zoo, **kw) -> EvaluateSpec:
    tasks = zoo.task_names[:2]
    return EvaluateSpec(
        tasks_dir=str(zoo.tasks_dir), tasks=tasks, limit=LIMIT, engine="quick", device="cpu", **kw
    )


def hf_nll(folder: Path, pairs: list[tuple[str, str]]) -> float:
    """Summed NLL of each continuation after its prompt through transformers' own loss (the
    mean over the labelled tokens; prompt positions labelled -100)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    total = 0.0
    with torch.inference_mode():
        for prompt, answer in pairs:
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + a])
            labels = torch.tensor([[-100] * len(p) + a])
            total += float(model(input_ids=ids, labels=labels).loss) * len(a)
    return total


def test_candidate_report_on_the_zoo(zoo_tiny: Zoo, tmp_path: Path) -> None:
    s = spec(zoo_tiny)
    t0, t1 = s.tasks
    candidate, champion = zoo_tiny.experts[t0], zoo_tiny.experts[t1]
    report = evaluate_candidate(
        str(candidate),
        s,
        base_uri=str(zoo_tiny.base),
        experts={t: str(zoo_tiny.experts[t]) for t in (t0, t1)},
        champion_uri=str(champion),
        champion_version="3",
    )
    # accuracies agree with the existing scorer, run independently
    model = AutoModelForCausalLM.from_pretrained(candidate)
    tokenizer = AutoTokenizer.from_pretrained(candidate)
    assert report.accuracy == pytest.approx(
        quick_evaluate(model, tokenizer, zoo_tiny.tasks_dir, [t0, t1], limit=LIMIT)
    )
    assert report.normalized_accuracy[t0] == pytest.approx(1.0)  # the candidate is t0's expert
    # flips from the kept per-example results, counted here by hand
    for t in (t0, t1):
        old, new = report.champion.tasks[t].correct, report.candidate.tasks[t].correct
        assert len(new) == LIMIT
        assert report.flips[t].negative == [i for i in range(LIMIT) if old[i] and not new[i]]
    # perplexity against transformers' own loss
    pairs = task_texts(zoo_tiny.tasks_dir, [t0, t1], "test", LIMIT)
    assert report.candidate.nll == pytest.approx(hf_nll(candidate, pairs), rel=1e-4)
    assert report.base.nll == pytest.approx(hf_nll(zoo_tiny.base, pairs), rel=1e-4)
    assert report.perplexity_ratio == pytest.approx(report.perplexity / report.base_perplexity)
    assert report.champion_version == "3"

    files = write_report(report, tmp_path / "out")
    names = sorted(p.name for p in files)
    assert names == ["accuracy.png", "negative_flips.png", "normalized_accuracy.png", "report.json"]
    for p in files:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert EvalReport.read(tmp_path / "out" / "report.json") == report


def test_precomputed_results_are_reused(zoo_tiny: Zoo) -> None:
    s = spec(zoo_tiny)
    first = evaluate_candidate(str(zoo_tiny.base), s, base_uri=str(zoo_tiny.base))
    cached = {str(zoo_tiny.base): first.base}
    again = evaluate_candidate(
        "/nowhere/candidate",
        s,
        base_uri=str(zoo_tiny.base),
        precomputed={"/nowhere/candidate": first.candidate, **cached},
    )
    assert again.accuracy == first.accuracy and again.perplexity_ratio == pytest.approx(1.0)


def test_lm_eval_samples_match_the_quick_scorer_example_by_example(zoo_tiny: Zoo) -> None:
    tasks = zoo_tiny.task_names[2:4]
    expert = zoo_tiny.experts[tasks[0]]
    samples = evaluate_model_samples(expert, zoo_tiny.tasks_dir, tasks, limit=LIMIT, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(expert)
    tokenizer = AutoTokenizer.from_pretrained(expert)
    for task in tasks:
        records = read_split(zoo_tiny.tasks_dir, task, "test")[:LIMIT]
        assert samples[task] == choice_correct(model, tokenizer, records)
    accs = evaluate_model(expert, zoo_tiny.tasks_dir, tasks, limit=LIMIT, device="cpu")
    assert accs == {t: pytest.approx(sum(c) / len(c)) for t, c in samples.items()}


def test_experts_default_to_models_named_like_tasks(zoo_tiny: Zoo) -> None:
    t0, t1 = zoo_tiny.task_names[:2]
    data = {
        "method": "task_arithmetic",
        "base": str(zoo_tiny.base),
        "models": [{"uri": str(zoo_tiny.experts[t0])}, {"uri": "/x/other", "name": "mine"}],
        "evaluate": {"tasks_dir": str(zoo_tiny.tasks_dir), "tasks": [t0, t1]},
    }
    assert experts_for(parse_recipe(data)) == {t0: str(zoo_tiny.experts[t0])}
    data["evaluate"]["experts"] = {t1: "mine", t0: "/y/expert"}
    assert experts_for(parse_recipe(data)) == {t1: "/x/other", t0: "/y/expert"}


def test_bad_requests_name_what_is_wrong(zoo_tiny: Zoo, tmp_path: Path) -> None:
    s = spec(zoo_tiny)
    with pytest.raises(EvaluationError, match="experts: no task named zoo_nosuch"):
        evaluate_candidate(str(zoo_tiny.base), s, experts={"zoo_nosuch": str(zoo_tiny.base)})
    with pytest.raises(EvaluationError, match="no model folder"):
        evaluate_candidate(str(tmp_path / "missing"), s)
    bad = EvaluateSpec(tasks_dir=str(zoo_tiny.tasks_dir), tasks=["zoo_nosuch"], engine="quick")
    with pytest.raises(EvaluationError, match="task zoo_nosuch: not a task folder"):
        evaluate_candidate(str(zoo_tiny.base), bad)


@pytest.mark.slow
def test_a_model_on_s3_scores_like_its_local_copy(s3, zoo_tiny: Zoo) -> None:
    import uuid

    bucket = f"eval-{uuid.uuid4().hex[:8]}"
    s3.make_bucket(bucket)
    task = zoo_tiny.task_names[0]
    s3.filesystem().put(str(zoo_tiny.experts[task]), f"{bucket}/expert", recursive=True)
    s = spec(zoo_tiny)
    remote = evaluate_candidate(
        f"s3://{bucket}/expert", s, base_uri=str(zoo_tiny.base), **s3.storage_options()
    )
    local = evaluate_candidate(str(zoo_tiny.experts[task]), s, base_uri=str(zoo_tiny.base))
    assert remote.candidate.tasks == local.candidate.tasks
    assert remote.perplexity == pytest.approx(local.perplexity)
