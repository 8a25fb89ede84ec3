"""lm-eval on the tiny zoo's task folders, offline; agreement with the fast scorer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from amalgam.evaluate import EvaluationError, evaluate_model, list_tasks, quick_evaluate
from amalgam.zoo import Zoo

LIMIT = 24


def quick(folder: Path, zoo: Zoo, tasks: list[str], split: str = "test") -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return quick_evaluate(model, tokenizer, zoo.tasks_dir, tasks, split=split, limit=LIMIT)


def test_every_task_loads_and_matches_the_fast_scorer(zoo_tiny: Zoo) -> None:
    assert list_tasks(zoo_tiny.tasks_dir) == sorted(zoo_tiny.task_names)
    scores = evaluate_model(zoo_tiny.base, zoo_tiny.tasks_dir, limit=LIMIT, device="cpu")
    assert set(scores) == set(zoo_tiny.task_names)
    assert all(0.0 <= acc <= 1.0 for acc in scores.values())
    assert scores == pytest.approx(quick(zoo_tiny.base, zoo_tiny, zoo_tiny.task_names))


def test_validation_split_scores_the_validation_records(zoo_tiny: Zoo) -> None:
    task = zoo_tiny.task_names[1]
    expert = zoo_tiny.experts[task]
    scores = evaluate_model(expert, zoo_tiny.tasks_dir, [task], limit=LIMIT, split="validation")
    assert scores == pytest.approx(quick(expert, zoo_tiny, [task], split="validation"))


def test_a_lora_adapter_folder_is_evaluated_on_its_base(zoo_tiny: Zoo) -> None:
    from peft import PeftModel

    task = zoo_tiny.task_names[2]
    scores = evaluate_model(zoo_tiny.loras[task], zoo_tiny.tasks_dir, [task], limit=LIMIT)
    base = AutoModelForCausalLM.from_pretrained(zoo_tiny.base)
    merged = PeftModel.from_pretrained(base, zoo_tiny.loras[task]).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(zoo_tiny.base)
    expected = quick_evaluate(merged, tokenizer, zoo_tiny.tasks_dir, [task], limit=LIMIT)
    assert scores == pytest.approx(expected)


def test_bad_requests_name_what_is_wrong(zoo_tiny: Zoo, tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=r"zoo_nosuch\.yaml"):
        evaluate_model(zoo_tiny.base, zoo_tiny.tasks_dir, ["zoo_nosuch"])
    with pytest.raises(EvaluationError, match="unknown split 'train'"):
        evaluate_model(zoo_tiny.base, zoo_tiny.tasks_dir, split="train")
    with pytest.raises(EvaluationError, match="neither a model folder nor a PEFT adapter"):
        evaluate_model(tmp_path, zoo_tiny.tasks_dir)
    with pytest.raises(EvaluationError, match="no tasks folder"):
        evaluate_model(zoo_tiny.base, tmp_path / "missing")


def test_importing_the_packages_loads_no_heavy_library() -> None:
    code = (
        "import sys, amalgam.evaluate, amalgam.zoo; "
        "print(sorted({'torch', 'transformers', 'lm_eval', 'peft'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
