"""speed.py's report: the main table's columns (read bound per method's bytes, the CLI's own
wall time, CPU model, tree state), the experts sweep, and the profile's grouping of samples."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


def _line_of(path: str, text: str) -> int:
    """The 1-based number of the first line of ``path`` holding ``text``."""
    lines = (ROOT / path).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


def test_profile_groups_samples_by_stack() -> None:
    speed = load_benchmark("speed")
    tv = "amalgam/methods/task_vectors.py"
    cast = _line_of(tv, "block = b[rows].float()")
    combine = _line_of(tv, "out[rows] = combine(")
    lin = _line_of("amalgam/methods/linear.py", "def linear(") + 1
    main = (
        "thread (101): MainThread;<module> (<string>:8);run_merge (amalgam/engine/__init__.py:40)"
    )
    stacks = "\n".join(
        [
            f"{main};task_vector_merge ({tv}:{cast}) 30",  # a cast: convert
            f"{main};task_vector_merge ({tv}:{combine}) 50",  # compute
            f"{main};trim (amalgam/methods/ties.py:10);"
            "kth_largest (amalgam/methods/sparsify.py:30) 20",
            f"{main};RandomDrop.fit (amalgam/methods/sparsify.py:125) 5",
            f"{main};wait (threading.py:320) 7",  # the leaf blocks: wait, whatever called it
            "thread (102): amalgam-read_0;_worker (concurrent/futures/thread.py:80);"
            "read_job (amalgam/engine/execute.py:70);"
            "Checkpoint._pread (amalgam/checkpoint.py:412) 40",
            "thread (103): amalgam-write_0;ShardWriter._append (amalgam/writer.py:104) 9",
            # the writer drives the merge: the innermost frame decides, here the method's sum
            "thread (101): MainThread;write_output (amalgam/engine/write.py:30);"
            f"run_unit (amalgam/engine/execute.py:200);linear (amalgam/methods/linear.py:{lin}) 4",
            "thread (101): MainThread;<module> (<string>:3);_find_and_load (<frozen x>:1) 11",
            "not a stack line",
        ]
    )
    got = speed.group_profile(stacks)
    assert set(got) == {"MainThread", "amalgam-read", "amalgam-write"}
    main_row = {g: s for g, s in got["MainThread"].items() if s}
    assert main_row == {
        "convert": 0.30,
        "compute": 0.54,
        "select": 0.20,
        "random mask": 0.05,
        "wait": 0.07,
        "other": 0.11,
    }
    assert {g: s for g, s in got["amalgam-read"].items() if s} == {"read": 0.40}
    assert {g: s for g, s in got["amalgam-write"].items() if s} == {"write": 0.09}
    table = speed.profile_markdown("ties", got, 1.5)
    assert "| all threads | 0.4 | 0.3 | 0.5 | 0.2 | 0.1 | 0.1 | 0.1 | 0.1 | 1.8 |" in table


def _lscpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln)


@pytest.mark.slow
def test_main_table_has_read_bound_ratio_and_cli_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    speed = load_benchmark("speed")
    monkeypatch.setattr(speed, "RESULTS", tmp_path / "results")
    argv = ["--params", "3.5e7", "--experts", "1", "--skip-mergekit", "--methods", "linear,ties"]
    assert speed.main([*argv, "--work", str(tmp_path / "work"), "--results", "t"]) == 0
    result = json.loads((tmp_path / "results" / "t.json").read_text())
    rb = result["read_bound"]
    per_model = result["params"] * 2  # bf16
    assert rb["bytes"] == 2 * per_model
    assert result["cpu"] == _lscpu_model()
    assert result["hash_s"] > 0
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["linear"]["input_bytes"] == per_model  # the expert only
    assert rows["ties"]["input_bytes"] == 2 * per_model  # the base too
    for row in rows.values():
        bound = rb["amalgam_s"] * row["input_bytes"] / rb["bytes"]
        assert row["engine_x_read_bound"] == pytest.approx(row["merge_s"] / bound)
        # hashes were cached beforehand: each input read once, tensors under 1 MiB through
        # pread, the larger ones mapped (no read call): some syscall bytes, never more
        assert 0 < row["syscall_read_bytes"] < row["input_bytes"] * 1.01
        # the command: interpreter, imports and its summary around the engine's own time
        assert 0 < row["cli_merge_s"] < row["cli_wall_s"]
    text = (tmp_path / "results" / "t.md").read_text()
    assert f"CPU: {_lscpu_model()}" in text
    state = "tree with local changes" if result["amalgam"]["dirty"] else "clean tree"
    assert f"amalgam {result['amalgam']['commit']}, {state}" in text
    assert "| in-engine × read bound |" in text and "| `amalgam merge` wall s |" in text


@pytest.mark.slow
def test_experts_sweep_one_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    speed = load_benchmark("speed")
    monkeypatch.setattr(speed, "RESULTS", tmp_path / "results")
    argv = ["--params", "3.5e7", "--experts-sweep", "1,2", "--methods", "linear"]
    assert speed.main([*argv, "--work", str(tmp_path / "work")]) == 0
    result = json.loads((tmp_path / "results" / "speed-sweep.json").read_text())
    families = sorted(p.name for p in (tmp_path / "work").glob("llama-*"))
    assert len(families) == 1 and families[0].endswith("-2x")  # one family, the largest N
    per_model = result["params"] * 2
    got = [(r["experts"], r["input_bytes"]) for r in result["rows"]]
    assert got == [(1, per_model), (2, 2 * per_model)]
    assert all(r["amalgam_rss"] > 0 and r["merge_s"] > 0 for r in result["rows"])
    text = (tmp_path / "results" / "speed-sweep.md").read_text()
    assert "| method | N=1: in-engine s (× read bound) | N=1: peak RSS GB | N=2:" in text
    assert text.count("| linear |") == 1
