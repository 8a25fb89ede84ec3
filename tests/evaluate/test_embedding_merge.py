"""TA, TIES and TSV-M merges of the MiniLM zoo's fine-tunes through the engine, scored by the
evaluate stage with the embedding scorer: each task normalized against its own fine-tune."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from amalgam.engine import MergeOptions, run_merge
from amalgam.evaluate.embedding import read_pooling
from amalgam.evaluate.report import REPORT_FILE, EvalReport
from amalgam.recipe import parse_recipe
from amalgam.stages import EvaluateInput, EvaluateStage, execute
from amalgam.stages.evaluate import model_hash, report_dir
from amalgam.writer import intact
from amalgam.zoo.minilm.recipes import MERGES, merge_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reports(zoo_minilm, tmp_path_factory) -> dict[str, EvalReport]:
    """Each method's merge and its evaluation report (one score cache: base and experts are
    scored once)."""
    work = tmp_path_factory.mktemp("minilm-merges")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AMALGAM_HOME", str(work / "home"))
        for method in MERGES:
            recipe = recipe_of(zoo_minilm, method, work)
            run_merge(recipe, MergeOptions(device="cpu"))
            out[method] = execute(EvaluateStage(), EvaluateInput(recipe, str(work / method)))
            assert (report_dir_of(recipe, work / method) / REPORT_FILE).is_file()
        # TIES against TA as champion: flips where the task has per-example results
        ties = recipe_of(zoo_minilm, "ties", work)
        champion = str(work / "task_arithmetic")
        out["ties vs ta"] = execute(
            EvaluateStage(), EvaluateInput(ties, str(work / "ties"), champion=champion)
        )
    return out


def recipe_of(zoo, method: str, work: Path):
    return parse_recipe(merge_recipe(zoo, method, work / method))


def report_dir_of(recipe, folder: Path) -> Path:
    return report_dir(model_hash(str(folder), recipe.storage_options))


@pytest.mark.parametrize("method", list(MERGES))
def test_merge_is_scored_against_each_expert(reports, method) -> None:
    report = reports[method]
    assert report.tasks == ["roles", "sentiment"]
    assert report.candidate.tasks["roles"].metric == "ndcg@10"
    assert report.candidate.tasks["sentiment"].metric == "acc"
    for task in report.tasks:
        expert = report.experts[task].tasks[task].accuracy
        assert report.normalized_accuracy[task] == pytest.approx(report.accuracy[task] / expert)
    assert report.perplexity is None and report.perplexity_ratio is None  # encoders: none


@pytest.mark.parametrize("method", list(MERGES))
def test_merge_keeps_both_skills_better_than_the_base(reports, method) -> None:
    report = reports[method]
    base = report.base.tasks
    experts = report.experts
    base_normalized = [base[t].accuracy / experts[t].tasks[t].accuracy for t in report.tasks]
    # each fine-tune beats the base on its own task clearly (the zoo's point) ...
    assert all(experts[t].tasks[t].accuracy > base[t].accuracy + 0.1 for t in report.tasks)
    # ... and the merge keeps more of both than the base has
    assert report.mean_normalized_accuracy > sum(base_normalized) / len(base_normalized)
    assert all(0.0 <= report.accuracy[t] <= 1.0 for t in report.tasks)


def test_flips_against_a_champion_only_where_examples_pass_or_fail(reports) -> None:
    report = reports["ties vs ta"]
    assert set(report.flips) == {"sentiment"}  # retrieval has no per-example pass or fail
    old = report.champion.tasks["sentiment"].correct
    new = report.candidate.tasks["sentiment"].correct
    lost = sum(o and not n for o, n in zip(old, new, strict=True))
    gained = sum(n and not o for o, n in zip(old, new, strict=True))
    assert report.flips["sentiment"].negative_flip_rate == pytest.approx(lost / len(old))
    assert report.flips["sentiment"].positive_flip_rate == pytest.approx(gained / len(old))
    assert report.negative_flip_rate == pytest.approx(lost / len(old))
    assert (
        report.candidate.tasks["sentiment"].correct
        == reports["ties"].candidate.tasks["sentiment"].correct
    )  # the same weights and settings: the same per-example results


ST_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json")


def test_merges_keep_the_sentence_transformers_files(zoo_minilm, s3, tmp_path) -> None:
    """Locally and on S3 (overwritten once: the old output's module folder is replaced), the
    merge carries the base's pooling files and its commit record covers them."""
    bucket = s3.make_bucket(f"minilm-{uuid.uuid4().hex[:8]}")
    remote, opts = f"s3://{bucket}/merged", s3.storage_options()
    local = tmp_path / "merged"
    run_merge(parse_recipe(merge_recipe(zoo_minilm, "task_arithmetic", local)))
    for method in ("task_arithmetic", "ties"):
        recipe = {**merge_recipe(zoo_minilm, method, remote), "storage_options": opts}
        run_merge(parse_recipe(recipe), MergeOptions(device="cpu", overwrite=True))
    fs = s3.filesystem()
    for name in ST_FILES:
        want = (zoo_minilm.base / name).read_bytes()
        assert (local / name).read_bytes() == want
        assert fs.cat_file(f"{bucket}/merged/{name}") == want
    assert intact(fsspec.filesystem("file"), str(local))
    assert intact(fs, f"{bucket}/merged")
    assert read_pooling(local) == read_pooling(zoo_minilm.base)
