"""The Twin-Merging benchmark on a few records of the tiny zoo: its rows, normalized accuracy
recomputed from the per-task scores, and its byte figures against the files."""

from __future__ import annotations

from pathlib import Path
from statistics import mean

from zoo.conftest import zoo_tiny

from tests.helpers import load_benchmark

__all__ = ["zoo_tiny"]

bench = load_benchmark("twin")


def test_rows_and_figures_agree_with_the_files(zoo_tiny, tmp_path: Path) -> None:
    result = bench.run("tiny", [2], [0.1], 3, 1, tmp_path / "work")
    rows = result["rows"]
    assert list(rows) == ["task_arithmetic", "ties", "twin rank=2", "twin share=0.1"]
    own = result["own"]
    for row in rows.values():
        assert set(row["test"]) == set(zoo_tiny.task_names)
        want = mean(row["test"][t] / own[t] if own[t] else 0.0 for t in own)
        assert abs(row["normalized"] - want) < 1e-12
        assert row["bytes_vs_experts"] == row["stored_bytes"] / result["experts_bytes"]
    for key, folder in (("twin rank=2", "twin-rank2"), ("twin share=0.1", "twin-share0.1")):
        out = tmp_path / "work" / folder
        weights = [p for p in out.iterdir() if p.suffix == ".safetensors" or p.name == "twin.json"]
        assert rows[key]["stored_bytes"] == sum(p.stat().st_size for p in weights)
        assert 0 <= rows[key]["router_test_accuracy"] <= 1
        assert rows[key]["ms_per_example"]["twin_scoring_total"] > 0
    experts = sum((p / "model.safetensors").stat().st_size for p in zoo_tiny.experts.values())
    assert result["experts_bytes"] == experts
    text = bench.markdown(result)
    assert all(f"| {name} |" in text for name in rows)
