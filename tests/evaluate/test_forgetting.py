"""Forgetting and BWT against a champion chain: a hand-worked chain, the first night, a
lower-is-better score, and the gates that bound them."""

from __future__ import annotations

import pytest

from amalgam.evaluate.forgetting import ChampionStep, measure_forgetting
from amalgam.evaluate.report import EvalReport, build_report
from amalgam.evaluate.results import ModelResult
from amalgam.recipe import Gates
from amalgam.registry import check_gates

T, F = True, False

# champion 1 absorbed a, champion 2 absorbed b (and scored c for the first time), 4 absorbed c
CHAIN = [
    ChampionStep(version="1", scores={"a": 0.8, "b": 0.3}, absorbed=["a"]),
    ChampionStep(version="2", scores={"a": 0.6, "b": 0.9, "c": 0.2}, absorbed=["b"]),
    ChampionStep(version="4", scores={"a": 0.7, "b": 0.5, "c": 0.6}, absorbed=["c"]),
]


def test_forgetting_is_the_best_earlier_champion_minus_now_and_bwt_the_mean_drop() -> None:
    found = measure_forgetting({"a": 0.5, "b": 1.0, "c": 0.6, "d": 0.4}, CHAIN)
    # a: best 0.8 (v1) - 0.5; b: best 0.9 (v2) - 1.0 (a gain); c: best 0.6 (v4) - 0.6;
    # d: no champion scored it, so no figure
    assert {t: round(f.forgetting, 12) for t, f in found.tasks.items()} == {
        "a": 0.3,
        "b": -0.1,
        "c": 0.0,
    }
    assert [found.tasks[t].best_version for t in "abc"] == ["1", "2", "4"]
    assert found.max_forgetting == pytest.approx(0.3)
    assert found.mean_forgetting == pytest.approx((0.3 - 0.1 + 0.0) / 3)
    # BWT: now minus just after absorption: a (0.5 - 0.8), b (1.0 - 0.9), c (0.6 - 0.6)
    assert found.absorbed_at == {"a": "1", "b": "2", "c": "4"}
    assert found.bwt == pytest.approx(((0.5 - 0.8) + (1.0 - 0.9) + 0.0) / 3)
    assert found.metrics() == pytest.approx(
        {
            "forgetting.a": 0.3,
            "forgetting.b": -0.1,
            "forgetting.c": 0.0,
            "max_forgetting": 0.3,
            "mean_forgetting": 0.2 / 3,
            "bwt": -0.2 / 3,
        }
    )


def test_first_night_has_nothing_to_forget() -> None:
    found = measure_forgetting({"a": 0.5}, [])
    assert found.tasks == {} and found.bwt is None and found.max_forgetting is None
    assert found.metrics() == {}


def test_lower_is_better_scores_count_a_rise_as_forgetting() -> None:
    chain = [ChampionStep(version="1", scores={"ppl": 12.0}, absorbed=["ppl"]),
             ChampionStep(version="2", scores={"ppl": 10.0}, absorbed=[])]  # fmt: skip
    found = measure_forgetting({"ppl": 11.0}, chain, {"ppl": False})
    assert found.tasks["ppl"].best == 10.0 and found.tasks["ppl"].forgetting == 1.0
    assert found.bwt == 1.0  # 11 against 12 just after absorption: better


def chained_report(candidate: dict[str, list[bool]]):
    rep = build_report(list(candidate), ModelResult.from_correct("/c", candidate))
    return rep.with_history(CHAIN[:2])


def test_forgetting_gates_name_the_task_and_figures() -> None:
    rep = chained_report({"a": [T, F, F, F], "b": [T, T, T, T]})  # a 0.25, b 1.0
    assert rep.metrics()["forgetting.a"] == pytest.approx(0.55)
    assert EvalReport.model_validate_json(rep.model_dump_json()) == rep  # as stored in MLflow
    assert check_gates(rep, Gates(max_forgetting=0.6, min_bwt=-0.3)) == []
    assert check_gates(rep, Gates(max_forgetting=0.5)) == [
        "max_forgetting: task a forgetting 0.5500 > 0.5 (best 0.8000 in champion version 1, "
        "now 0.2500)"
    ]
    assert check_gates(rep, Gates(max_forgetting={"b": 0.0})) == []  # a has no bound
    # BWT over a (0.25 - 0.8) and b (1.0 - 0.9)
    assert check_gates(rep, Gates(min_bwt=-0.2)) == [
        "min_bwt: backward transfer -0.2250 < -0.2 over a (absorbed in version 1), "
        "b (absorbed in version 2)"
    ]


def test_forgetting_gates_pass_on_the_first_night_and_fail_without_figures() -> None:
    first = build_report(["a"], ModelResult.from_correct("/c", {"a": [F]})).with_history([])
    assert check_gates(first, Gates(max_forgetting=0.0, min_bwt=0.0)) == []
    plain = build_report(["a"], ModelResult.from_correct("/c", {"a": [F]}))
    assert check_gates(plain, Gates(min_bwt=0.0)) == [
        "min_bwt: the report has no forgetting figures (a nightly run measures them)"
    ]
