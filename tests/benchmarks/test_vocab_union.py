"""The vocabulary-union benchmark on the tiny zoo's variants: both merges scored on the
new-token tasks, every input token round-trips through the union tokenizer."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark


@pytest.mark.slow
def test_tiny_run_scores_both_merges_and_round_trips(monkeypatch, tmp_path) -> None:
    bench = load_benchmark("vocab_union")
    monkeypatch.setattr(bench, "WORK", tmp_path)
    result = bench.run("tiny", ["task_arithmetic"], limit=32)
    tasks = result["tasks"]
    assert len(tasks) == 2
    row = result["merges"]["task_arithmetic"]
    for kind in ("union", "reference", "without ownership, init mean"):
        assert set(row[kind]) == set(tasks)
        assert all(0.0 <= row[kind][t] <= 100.0 for t in tasks)
    assert row["round_trip"]["tokens"] > 1000 and row["round_trip"]["failed"] == 0
    # the added tokens' rows are their expert's; a mean fill merged without ownership moves them
    assert row["row_error"]["union"] == 0.0
    assert row["row_error"]["without ownership, init mean"] > 0.05
    assert "| task_arithmetic union |" in bench.markdown(result)
