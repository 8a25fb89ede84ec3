"""scale.py --quick on one Ray worker node: the benchmark runs end to end from a clean work
folder, its Ray output equals the local executor's, and every run is measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_benchmark
from tests.multinode.cluster import namespaces_usable


@pytest.mark.slow
def test_quick_scale_run_on_one_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reason = namespaces_usable()
    if reason:
        pytest.skip(f"scale benchmark: {reason}")
    scale = load_benchmark("scale")
    monkeypatch.setattr(scale.speed, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    assert scale.main(["--quick", "--nodes", "1", "--work", str(tmp_path / "work")]) == 0
    result = json.loads((tmp_path / "results" / "scale-quick.json").read_text())
    assert result["shards"] > 1  # several Ray tasks
    for method, runs in result["results"].items():
        assert sorted(runs) == ["local", "ray1"], method
        assert runs["ray1"]["identical"] and runs["ray1"]["files"] == runs["local"]["files"]
        for run in runs.values():
            assert run["wall_s"] > 0 and run["driver_peak_rss"] > 0 and run["engine_s"] > 0
    table = (tmp_path / "results" / "scale-quick.md").read_text()
    assert "| ties | ray | 1 |" in table and "| task_arithmetic | local | 1 |" in table
