"""Metrics on hand-built per-example results: accuracy, normalized accuracy, flips, perplexity."""

from __future__ import annotations

import math

import pytest

from amalgam.evaluate import metrics
from amalgam.evaluate.metrics import MetricError
from amalgam.evaluate.report import build_report
from amalgam.evaluate.results import ModelResult, TaskResult

T, F = True, False
# Per-example correctness on two tasks (8 and 5 examples).
CANDIDATE = {"sort": [T, T, F, T, F, T, T, F], "count": [T, F, T, T, T]}
CHAMPION = {"sort": [T, F, T, T, T, T, F, F], "count": [T, T, T, F, T]}
BASE = {"sort": [F, F, T, F, F, T, F, F], "count": [F, F, T, F, T]}
EXPERTS = {"sort": [T, T, T, T, F, T, T, F], "count": [T, T, T, T, F]}


def test_flips_by_hand() -> None:
    f = metrics.flips(CHAMPION["sort"], CANDIDATE["sort"])
    # champion right, candidate wrong: examples 2 and 4; champion wrong, candidate right: 1, 6
    assert f.negative == [2, 4] and f.positive == [1, 6]
    assert f.negative_flip_rate == 2 / 8 and f.positive_flip_rate == 2 / 8
    g = metrics.flips(CHAMPION["count"], CANDIDATE["count"])
    assert g.negative == [1] and g.positive == [3]
    # acc_new - acc_old = PFR - NFR
    gain = metrics.accuracy(CANDIDATE["count"]) - metrics.accuracy(CHAMPION["count"])
    assert gain == pytest.approx(g.positive_flip_rate - g.negative_flip_rate)
    assert metrics.pooled_negative_flip_rate({"sort": f, "count": g}) == 3 / 13


def test_normalized_accuracy_and_undefined_values() -> None:
    assert metrics.normalized_accuracy(0.5, 0.8) == 0.625
    assert metrics.normalized_accuracy(0.5, 0.0) is None
    assert metrics.mean_defined([0.5, None, 1.0]) == 0.75
    assert metrics.mean_defined([None]) is None


def test_perplexity_is_the_exponential_of_the_mean_nll() -> None:
    assert metrics.perplexity(2 * math.log(3), 2) == pytest.approx(3.0)
    assert metrics.perplexity_ratio(6.0, 3.0) == 2.0


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(MetricError, match="sort: the old model has 2 results and the new one 3"):
        metrics.flips([T, F], [T, F, T], "sort")
    with pytest.raises(MetricError):
        metrics.accuracy([])
    with pytest.raises(MetricError):
        metrics.perplexity(1.0, 0)


def test_report_from_hand_built_results() -> None:
    candidate = ModelResult.from_correct("cand", CANDIDATE, nll=30.0, tokens=20)
    base = ModelResult.from_correct("base", BASE, nll=20.0, tokens=20)
    experts = {t: ModelResult.from_correct(f"exp-{t}", {t: c}) for t, c in EXPERTS.items()}
    champion = ModelResult.from_correct("champ", CHAMPION)
    report = build_report(
        ["sort", "count"],
        candidate,
        base=base,
        experts=experts,
        champion=champion,
        champion_version="4",
    )
    assert report.accuracy == {"sort": 5 / 8, "count": 4 / 5}
    assert report.mean_accuracy == pytest.approx((5 / 8 + 4 / 5) / 2)
    assert report.normalized_accuracy == {"sort": (5 / 8) / (6 / 8), "count": (4 / 5) / (4 / 5)}
    assert report.mean_normalized_accuracy == pytest.approx((5 / 6 + 1.0) / 2)
    assert report.flips["sort"].negative == [2, 4]
    assert report.negative_flip_rate == 3 / 13
    assert report.perplexity == pytest.approx(math.exp(1.5))
    assert report.perplexity_ratio == pytest.approx(math.exp(1.5) / math.exp(1.0))
    flat = report.metrics()
    assert flat["negative_flip_rate.sort"] == 0.25 and flat["accuracy.count"] == 0.8
    assert flat["normalized_accuracy.sort"] == pytest.approx(5 / 6)
    again = type(report).model_validate_json(report.model_dump_json())
    assert again == report


def test_report_without_champion_or_experts_leaves_those_metrics_out() -> None:
    report = build_report(["sort"], ModelResult.from_correct("c", {"sort": CANDIDATE["sort"]}))
    assert report.flips is None and report.negative_flip_rate is None
    assert report.normalized_accuracy == {"sort": None}
    assert set(report.metrics()) == {"mean_accuracy", "accuracy.sort"}


def test_a_lower_is_better_score_normalizes_the_other_way_and_has_no_flips() -> None:
    assert metrics.normalized_accuracy(20.0, 16.0, higher_is_better=False) == 0.8

    def result(uri: str, ppl: float) -> ModelResult:
        model = ModelResult.from_correct(uri, {"sort": CANDIDATE["sort"]})
        model.tasks["text"] = TaskResult(
            accuracy=ppl, correct=[], metric="word_perplexity", higher_is_better=False
        )
        return model

    candidate, champion = result("cand", 20.0), result("champ", 18.0)
    report = build_report(
        ["sort", "text"], candidate, experts={"text": result("exp", 16.0)}, champion=champion
    )
    assert report.normalized_accuracy["text"] == 0.8
    assert report.flips is not None and set(report.flips) == {"sort"}
    assert report.negative_flip_rate == report.flips["sort"].negative_flip_rate
    assert "negative_flip_rate.text" not in report.metrics()
