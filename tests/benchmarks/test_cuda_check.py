"""The CUDA check run as cpu against cpu: every method compared, failures and drift reported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from amalgam.methods import REGISTRY
from tests.helpers import load_benchmark

TINY = ["--layers", "1", "--hidden", "32", "--llama-layers", "1", "--llama-hidden", "32"]

check = load_benchmark("cuda_check")


def run(tmp_path: Path, *args: str) -> tuple[int, list[dict]]:
    out = tmp_path / "rows.json"
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    code = check.main(
        ["--devices", "cpu,cpu", *TINY, "--json", str(out), "--work", str(work), *args]
    )
    assert not any(work.iterdir()), "the work folder is left behind"
    return code, json.loads(out.read_text())["rows"]


def test_every_method_compared_with_no_difference(tmp_path: Path) -> None:
    home = os.environ.get("AMALGAM_HOME")
    code, rows = run(tmp_path, "--examples", "8")
    assert os.environ.get("AMALGAM_HOME") == home
    by_label = {r["label"]: r for r in rows}
    merges = [r for r in rows if r["kind"] != "statistics"]
    assert {r["method"] for r in merges} == set(REGISTRY)
    data = {n for n, m in REGISTRY.items() if m.statistics is not None}
    continual = {n for n, m in REGISTRY.items() if m.continual}
    assert data == {"fisher", "regmean"} and {"opcm", "continual_avg"} <= continual
    for r in rows:
        assert "error" not in r, f"{r['label']}: {r['error']}"
        assert r["ok"] and r["max_abs"] == 0.0 and r["value"] == 0.0, r["label"]
        assert r["identical"] == r["tensors"] > 0, r["label"]
        assert set(r["seconds"]) == ({"cpu", "cpu#2"} if r["kind"] != "statistics" else set())
    for name in data:
        assert by_label[name]["kind"] == "data"
        # both runs computed their own artifacts (one per expert), found under their own homes
        assert by_label[f"{name} statistics"]["tensors"] > 0
    for name in continual:
        assert by_label[name]["kind"] == "continual"
    assert by_label["ties trim=model"]["method"] == "ties"
    assert code == 0


def test_a_failure_and_a_drift_fail_the_run_without_hiding_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ties raises on the second run; task_arithmetic's second run uses another lambda."""
    real = check.run_merge

    def run_merge(recipe, options):
        second = recipe.output.endswith("-1")
        if second and recipe.method == "ties":
            raise RuntimeError("boom on the second device")
        if second and recipe.method == "task_arithmetic":
            recipe = recipe.model_copy(update={"params": {"lambda": 0.9}})
        return real(recipe, options)

    monkeypatch.setattr(check, "run_merge", run_merge)
    code, rows = run(tmp_path, "--methods", "ties,task_arithmetic,linear")
    assert code == 1
    by_label = {r["label"]: r for r in rows}
    assert by_label["ties"]["error"] == "on cpu#2: RuntimeError: boom on the second device"
    assert by_label["ties trim=model"]["error"].startswith("on cpu#2: RuntimeError")
    assert not by_label["task_arithmetic"]["ok"] and by_label["task_arithmetic"]["value"] > 1
    assert by_label["linear"]["ok"] and by_label["linear"]["max_abs"] == 0.0


def save(path: Path, values: list[float]) -> Path:
    save_file({"w": torch.tensor(values, dtype=torch.bfloat16)}, str(path))
    return path


def test_differences_are_counted_in_ulps_of_the_larger_magnitude(tmp_path: Path) -> None:
    # bf16 keeps 8 significant bits: spacing 2^-7 in [1, 2), 2^-8 in [0.5, 1), 2^-3 in [16, 32)
    a = save(tmp_path / "a.safetensors", [1.0, 1.5, 20.0, 0.0])
    b = save(tmp_path / "b.safetensors", [1.0 - 2**-8, 1.5 + 2**-7, 20.0 - 2 * 2**-3, 0.0])
    c = check.compare_folders(a, b)
    # 1 - 2^-8 against 1.0: half of 1.0's ulp; 1.5 + 2^-7: one ulp; 20 - 2^-2: two ulps
    assert c.max_ulps == 2.0 and c.max_abs == 0.25
    assert c.max_rel == pytest.approx(0.25 / 20.0)
    assert (c.identical, c.tensors) == (0, 1)
    one = check.compare_folders(a, save(tmp_path / "c.safetensors", [1.0 - 2**-8, 1.5, 20.0, 0]))
    assert one.max_ulps == 0.5 and one.max_abs == 2**-8


def test_the_timing_rows_compare_both_copy_paths_with_the_cpu(tmp_path: Path) -> None:
    """The timing section run as cpu against cpu (no bandwidth then): every speed config timed
    three ways, the bytes of each run compared."""
    out, work = tmp_path / "timing.json", tmp_path / "work"
    work.mkdir()
    args = ["--devices", "cpu,cpu", "--timing-params", "1", "--timing-only", "--json", str(out)]
    assert check.main([*args, "--work", str(work)]) == 0
    assert not any(work.iterdir()), "the work folder is left behind"
    timing = json.loads(out.read_text())["timing"]
    assert [r["method"] for r in timing["rows"]] == list(check.cuda_timing.METHODS)
    assert "h2d_pinned_gb_s" not in timing  # no CUDA device: no bandwidth
    for r in timing["rows"]:
        assert r["transfer_bound_s"] is None and 0 < r["read_bound_s"] < r["cpu_s"]
        assert r["input_gb"] > 0 and min(r["sync_s"], r["overlap_s"]) > 0
        for same in (r["overlap_vs_sync"], r["overlap_vs_cpu"]):
            assert same["identical"] == same["tensors"] == 12 and same["max_ulps"] == 0.0


def test_a_timing_row_fails_on_a_changed_byte_or_a_drift_past_the_tolerance() -> None:
    def row(method: str, sync_same: int, cpu_ulps: float) -> dict:
        return {
            "method": method,
            "overlap_vs_sync": {"identical": sync_same, "tensors": 12, "max_ulps": 0.0},
            "overlap_vs_cpu": {"identical": 12, "tensors": 12, "max_ulps": cpu_ulps},
        }

    rows = [row("linear", 12, 0.0), row("ties", 11, 0.0), row("dare_ties", 12, 1.5)]
    assert check.cuda_timing.failures({"rows": rows}, check.MAX_ULPS) == [
        "timing ties",
        "timing dare_ties",
    ]
