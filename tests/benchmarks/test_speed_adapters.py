"""speed.py --adapters on a small model: both merges run, and amalgam equals its reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_benchmark


@pytest.mark.slow
def test_adapter_merge_against_peft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    speed = load_benchmark("speed")
    monkeypatch.setattr(speed, "RESULTS", tmp_path / "results")
    argv = ["--adapters", "2", "--rank", "4", "--quick", "--work", str(tmp_path / "work")]
    assert speed.main(argv) == 0
    result = json.loads((tmp_path / "results" / "speed-adapters-quick.json").read_text())
    assert result["adapters"] == 2 and result["rank"] == 4
    adapters = sorted((tmp_path / "work").glob("llama-*-0x/adapters-r4-2x/adapter*"))
    assert [a.name for a in adapters] == ["adapter1", "adapter2"]
    config = json.loads((adapters[0] / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == set(speed.ADAPTER_TARGETS)
    for tool in ("amalgam", "peft"):
        assert result[tool]["wall_s"] > 0 and result[tool]["peak_rss"] > 0
    compared = result["compare"]
    assert compared["only_in_amalgam"] == compared["only_in_mergekit"] == []
    assert compared["elements"] == result["params"]
    gaps = result["reference_gaps"]
    assert gaps["amalgam_vs_rounded"] == 0  # merge_and_unload of each adapter, then TA
    assert 0 < gaps["amalgam_vs_exact"] < 2e-3  # bf16 rounding of each adapter's model
    assert gaps["peft_vs_exact"] < 1e-3
    assert compared["max_abs_diff"] < 2e-3
    assert (
        "| amalgam (`run_merge`) |"
        in (tmp_path / "results" / "speed-adapters-quick.md").read_text()
    )
