"""Bad evaluation requests through `amalgam evaluate`: one `error:` line naming what is wrong
and what to do, exit code 2, no traceback and no wait on the network."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from amalgam.evaluate.catalog import load_tasks
from amalgam.evaluate.taskdir import EvaluationError
from amalgam.recipe import EvaluateSpec
from amalgam.zoo import Zoo
from tests.helpers import run_cli


def error_line(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: Any) -> str:
    code, _, err = run_cli(["evaluate", *args, "--device", "cpu"], monkeypatch, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def test_an_unknown_lm_eval_task_is_named_with_close_matches(
    zoo_tiny: Zoo, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    line = error_line([str(zoo_tiny.base), "--tasks", "arc_esy"], monkeypatch, capsys)
    assert "task arc_esy: not a task folder" in line
    assert "close matches: arc_easy" in line


def test_a_task_whose_dataset_is_not_local_fails_fast_saying_how_to_fix_it(
    zoo_tiny: Zoo, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    started = time.monotonic()
    line = error_line([str(zoo_tiny.base), "--tasks", "arc_easy"], monkeypatch, capsys)
    assert time.monotonic() - started < 60  # the index takes seconds; no network timeout
    assert "task arc_easy: its dataset is not on this machine" in line
    assert "allenai/ai2_arc" in line  # what datasets could not find
    assert "task_overrides {arc_easy: {dataset_path: json" in line
    assert "HF_DATASETS_CACHE" in line


def test_a_generation_limit_of_zero_or_past_the_context_is_refused(
    zoo_tiny: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    base, tasks_dir = str(zoo_tiny.base), str(zoo_tiny.tasks_dir)
    line = error_line(
        [base, "--tasks", "zoo_sort_gen", "--tasks-dir", tasks_dir, "--max-gen-toks", "0"],
        monkeypatch,
        capsys,
    )
    assert line == "error: --max-gen-toks: Input should be greater than 0"
    # more than the model's context leaves room for (the zoo's models read 64 tokens)
    line = error_line(
        [base, "--tasks", "zoo_sort_gen", "--tasks-dir", tasks_dir, "--max-gen-toks", "64"],
        monkeypatch,
        capsys,
    )
    assert line == (
        f"error: task zoo_sort_gen: max_gen_toks 64 leaves no room for a prompt in the "
        f"64-token context of {base}; set evaluate.max_gen_toks below 64"
    )
    # the same limit written in a task's own YAML
    data = zoo_tiny.tasks_dir / "zoo_sort" / "test.jsonl"
    yaml = {
        "task": "sort_no_tokens",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": "prompt",
        "doc_to_target": "{{choices[label]}}",
        "generation_kwargs": {"until": ["</s>"], "max_gen_toks": 0},
        "metric_list": [{"metric": "exact_match"}],
    }
    (tmp_path / "sort_no_tokens.yaml").write_text(json.dumps(yaml))
    line = error_line(
        [base, "--tasks", "sort_no_tokens", "--include-path", str(tmp_path)], monkeypatch, capsys
    )
    assert "task sort_no_tokens: generation_kwargs.max_gen_toks is 0" in line


def test_bad_settings_name_their_option(
    zoo_tiny: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    base, tasks_dir = str(zoo_tiny.base), ["--tasks-dir", str(zoo_tiny.tasks_dir)]
    for option, value in (("--batch-size", "big"), ("--dtype", "float8"), ("--split", "train")):
        line = error_line([base, *tasks_dir, option, value], monkeypatch, capsys)
        assert line.startswith(f"error: {option}: "), line
    line = error_line(
        [base, "--tasks", "zoo_sort", "--include-path", str(tmp_path / "nowhere")],
        monkeypatch,
        capsys,
    )
    assert line == f"error: include_path: no folder at {tmp_path / 'nowhere'}"
    line = error_line([base, "--tasks", "arc_easy", "--split", "validation"], monkeypatch, capsys)
    assert "task arc_easy: split validation applies to the task folders of tasks_dir" in line


def test_an_override_for_a_task_not_evaluated_is_an_error(zoo_tiny: Zoo) -> None:
    spec = EvaluateSpec(
        tasks_dir=str(zoo_tiny.tasks_dir),
        tasks=["zoo_sort"],
        task_overrides={"zoo_srot": {"num_fewshot": 0}},
    )
    with pytest.raises(EvaluationError, match=r"task_overrides: zoo_srot is not among"):
        load_tasks(spec, ["zoo_sort"])
    with pytest.raises(ValueError, match="tasks: name the tasks to run"):
        EvaluateSpec()
