"""speed.py --align on a small model: weight matching undoes the permutation, so the aligned
merge equals the plain one, and both runs are measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_benchmark


@pytest.mark.slow
def test_align_then_merge_equals_the_plain_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    speed = load_benchmark("speed")
    monkeypatch.setattr(speed, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    assert speed.main(["--align", "--quick", "--work", str(tmp_path / "work")]) == 0
    result = json.loads((tmp_path / "results" / "speed-align-quick.json").read_text())
    assert result["compare"]["max_abs_diff"] == 0.0
    assert result["compare"]["elements"] == result["params"]
    for run in result["runs"].values():
        assert run["wall_s"] > 0 and run["peak_rss"] > 0
    (search,) = result["search"].values()
    assert search["seconds"] > 0 and search["passes"] >= 1
    assert "peak RSS under 2 GB" in (tmp_path / "results" / "speed-align-quick.md").read_text()
