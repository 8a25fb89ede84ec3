"""The MC-SMoE benchmark end to end on the tiny zoo (8 test examples per task), on an MoE built
from its experts and on the zoo's own MoE: every row's parameters as transformers loads them
equal the compression report's, the LoSparse row stores fewer numbers and bytes than the dense
merge, alignment moves units of the zoo MoE's experts (trained from different inits), the MoE
row keeps 100%, the report names every row and the plot is written."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from zoo.conftest import zoo_tiny

from tests.helpers import BENCHMARKS, load_benchmark

__all__ = ["zoo_tiny"]


@pytest.mark.parametrize("subject", ["built", "zoo"])
def test_the_benchmark_runs_on_the_tiny_zoo(
    zoo_tiny, subject: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports moe_build's scorer
    bench = load_benchmark("compress_moe")
    args = argparse.Namespace(
        profile="tiny",
        limit=8,
        prompts=4,
        calibration=4,
        work=str(tmp_path / "work"),
        subject=subject,
        zoo=None,
        losparse="4:0.05",
    )
    result = bench.run(args, log=lambda _: None)
    rows = result["rows"]
    assert len(rows) == 1 + len(bench.TARGETS) * len(bench.METHODS) + 1
    for label, row in rows.items():
        assert row["params"] == row.get("params_report", row["params"]), label
    half, quarter = bench.TARGETS  # LoSparse rows follow the half's
    methods = len(bench.METHODS)
    assert [r["experts"] for r in rows.values()] == [8] + [half] * (methods + 1) + [
        quarter
    ] * methods
    dense, packed = rows["mc_smoe, 4 experts"], rows["mc_smoe + losparse r=4 d=0.05, 4 experts"]
    assert packed["params"] == dense["params"] and packed["params_stored"] < dense["params"]
    assert packed["bytes"] < dense["bytes"]
    if subject == "zoo":
        assert result["moe_origin"] == f"zoo build {zoo_tiny.root.name}"
        assert rows["mc_smoe, 2 experts"]["units_moved"] > 0
    assert bench.summary(result)["moe (8 experts)"]["kept"] == 1.0
    text = bench.report(result)
    assert all(f"| {label} |" in text for label in rows)
    calibration = (tmp_path / "work" / "calibration.jsonl").read_text().splitlines()
    assert len(calibration) == 4 * len(result["tasks"])
    assert set(json.loads(calibration[0])) == {"prompt", "answer"}
    bench.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
