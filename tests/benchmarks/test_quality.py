"""The quality benchmark's --quick run: every registered method reported, numbers sane."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from amalgam.evaluate.quick import quick_evaluate
from amalgam.methods.base import REGISTRY, get_method
from amalgam.zoo import Zoo, default_zoo_dir
from tests.helpers import load_benchmark


def accuracies_ok(scores: dict[str, float], tasks: list[str]) -> bool:
    return set(scores) == set(tasks) and all(0.0 <= scores[t] <= 1.0 for t in tasks)


@pytest.mark.slow
def test_quick_run_reports_every_method(tmp_path: Path) -> None:
    quality = load_benchmark("quality")
    assert quality.main(["--quick", "--results", str(tmp_path), "--work", str(tmp_path / "w")]) == 0
    result = json.loads((tmp_path / "quality-quick.json").read_text())
    assert (tmp_path / "quality-quick.png").stat().st_size > 10_000
    markdown = (tmp_path / "quality-quick.md").read_text()
    tasks = result["tasks"]
    assert len(tasks) == 4

    get_method("linear")
    full = result["experts"]["full"]
    assert set(full["methods"]) == set(REGISTRY) | set(quality.VARIANTS)
    for label, drive in quality.VARIANTS.items():  # each ran its method with its setting
        row = full["methods"][label]
        assert row["method"] == drive.method and row["overrides"] == list(drive.overrides)
        assert row.get("default", row)["params"] == drive.defaults
    for name, row in full["methods"].items():
        assert "failed" not in row, f"{name}: {row.get('failed')}"
        assert f"| {name} |" in markdown or f"| {name} " in markdown
        if "skipped" in row:
            continue
        if row["kind"] == "continual":
            for run in row["orders"].values():
                assert accuracies_ok(run["test"], tasks)
                assert run["average"] == pytest.approx(mean(run["test"].values()))
                # BWT recomputed from the per-step scores the run recorded
                bwt = mean(run["test"][t] - run["just_absorbed"][t] for t in run["order"][:-1])
                assert run["bwt"] == pytest.approx(bwt)
            continue
        for label in ("default", "tuned"):
            if label in row:
                r = row[label]
                assert accuracies_ok(r["test"], tasks)
                own = full["own"]
                assert r["normalized"] == pytest.approx(mean(r["test"][t] / own[t] for t in tasks))
        if "tuned" in row:
            curve = row["tuned"]["validation_curve"]
            assert len(curve) >= 2
            best = max(curve.values())
            assert curve[str(row["tuned"]["params"][row["tuned"]["scalar"]])] == best

    # the reference rows: the experts are on average clearly above the base on their own task
    reference = full["reference"]
    base, own = reference["base"], full["own"]
    assert mean(own.values()) > mean(base[t] for t in tasks) + 0.05
    assert any(own[t] > base[t] for t in tasks)
    # each expert alone at lambda: base + lambda * task vector, formed here and scored directly
    alone = full["scaled_alone"]
    task = tasks[0]
    assert set(alone["test"]) == set(tasks) and alone["lambda"] == 0.3
    zoo = Zoo.load(default_zoo_dir() / result["zoo"])
    model = AutoModelForCausalLM.from_pretrained(zoo.experts[task])
    base_state = AutoModelForCausalLM.from_pretrained(zoo.base).state_dict()
    lam, expert = alone["lambda"], model.state_dict()
    model.load_state_dict({k: b + lam * (expert[k] - b) for k, b in base_state.items()})
    scored = quick_evaluate(
        model, AutoTokenizer.from_pretrained(zoo.base), zoo.tasks_dir, [task], limit=result["limit"]
    )
    assert alone["test"][task] == pytest.approx(scored[task])
    assert f"each expert alone, task vector x {alone['lambda']}" in markdown
    # merging the LoRA experts after merge_and_unload reports the same methods
    lora = result["experts"]["lora"]
    one_shot = {n for n, r in full["methods"].items() if r["kind"] != "continual"}
    assert set(lora["methods"]) == one_shot
    assert accuracies_ok(lora["reference"]["base"], tasks) and base == lora["reference"]["base"]


@pytest.mark.slow
def test_adapter_rows_equal_merge_and_unload_rows(tmp_path: Path) -> None:
    quality = load_benchmark("quality")
    argv = ["--quick", "--adapters", "--methods", "task_arithmetic,ties,fisher", "--tasks", "2"]
    argv += ["--results", str(tmp_path), "--work", str(tmp_path / "w")]
    assert quality.main(argv) == 0
    result = json.loads((tmp_path / "quality-adapters-quick.json").read_text())
    lora, adapter = result["experts"]["lora"], result["experts"]["adapter"]
    # fisher runs each model on data, which an adapter cannot: not a row of either section
    assert set(lora["methods"]) == set(adapter["methods"]) == {"task_arithmetic", "ties"}
    zoo = Zoo.load(default_zoo_dir() / result["zoo"])
    tasks = result["tasks"]
    assert adapter["models"] == {t: str(zoo.loras[t]) for t in tasks}  # the folders themselves
    assert lora["models"] != adapter["models"]
    for name, row in adapter["methods"].items():
        other = lora["methods"][name]
        for label in ("default", "tuned"):
            assert accuracies_ok(row[label]["test"], tasks)
            assert row[label]["test"] == other[label]["test"], (name, label)
            assert row[label]["params"] == other[label]["params"]
    equality = result["adapter_equality"]
    assert set(equality["methods"]) == {"task_arithmetic", "ties"}
    for runs in equality["methods"].values():
        assert all(r["max_accuracy_diff"] == 0 and r["same_params"] for r in runs.values())
    assert 0 <= equality["tensor_check"]["max_abs_diff"] < 1e-5  # float32 rounding
    markdown = (tmp_path / "quality-adapters-quick.md").read_text()
    assert "## LoRA adapters through the engine" in markdown
    assert "## Adapters through the engine against merge_and_unload" in markdown
