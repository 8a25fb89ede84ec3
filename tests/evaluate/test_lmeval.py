"""Any lm-eval task, offline: the project's task folders, a generate_until task, the user's own
YAMLs and lm-eval's registry tasks give, through `score_model` and `amalgam evaluate`, the
per-example results lm-eval gives when called directly; perplexity; dtype; remote models."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from amalgam.evaluate.report import build_report
from amalgam.evaluate.score import score_model
from amalgam.evaluate.taskdir import read_split
from amalgam.recipe import EvaluateSpec, parse_recipe
from amalgam.stages.evaluate import data_hash, score_all, wanted
from amalgam.zoo import Zoo
from tests.helpers import run_cli

LIMIT = 16
LIMITED = ["--limit", str(LIMIT)]
ARC_EASY = Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"


def direct(model: Path, tasks: list[str], include_path: str, **kw: Any) -> dict:
    """lm-eval called as its README shows, on CPU in float32."""
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model},dtype=float32",
        tasks=tasks,
        task_manager=TaskManager(include_path=include_path, include_defaults=False),
        device="cpu",
        batch_size=8,
        limit=kw.pop("limit", LIMIT),
        log_samples=True,
        bootstrap_iters=0,
        **kw,
    )


def per_example(results: dict, task: str, metric: str, filter_name: str = "none") -> list:
    samples = [s for s in results["samples"][task] if s["filter"] == filter_name]
    return [s[metric] for s in sorted(samples, key=lambda s: s["doc_id"])]


def cli_json(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: Any) -> dict:
    code, out, err = run_cli(["evaluate", *args, "--device", "cpu", "--json"], monkeypatch, capsys)
    assert code == 0, err
    return json.loads(out)


def test_folder_and_generative_tasks_match_lm_eval_called_directly(
    zoo_tiny: Zoo, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    expert, tasks = zoo_tiny.experts["zoo_sort"], ["zoo_sort", "zoo_sort_gen"]
    ref = direct(expert, tasks, str(zoo_tiny.tasks_dir))
    expected = {
        "zoo_sort": [bool(v) for v in per_example(ref, "zoo_sort", "acc")],
        "zoo_sort_gen": [
            bool(v) for v in per_example(ref, "zoo_sort_gen", "exact_match", "answer")
        ],
    }
    spec = EvaluateSpec(tasks_dir=str(zoo_tiny.tasks_dir), tasks=tasks, limit=LIMIT, device="cpu")
    result = score_model(str(expert), spec, tasks)
    # the CLI with lm-eval's automatic batch size: the same answers as batches of 8 and 32
    folder = ["--tasks-dir", str(zoo_tiny.tasks_dir), "--batch-size", "auto", *LIMITED]
    cli = cli_json([str(expert), "--tasks", ",".join(tasks), *folder], monkeypatch, capsys)
    cli = cli[str(expert)]["tasks"]
    for task, key in (("zoo_sort", "acc,none"), ("zoo_sort_gen", "exact_match,answer")):
        assert len(expected[task]) == LIMIT
        assert result.tasks[task].correct == expected[task] == cli[task]["correct"]
        assert result.tasks[task].accuracy == pytest.approx(ref["results"][task][key])
    assert result.tasks["zoo_sort_gen"].metric == cli["zoo_sort_gen"]["metric"] == "exact_match"
    # the generated answers are neither all right nor all wrong: the comparison means something
    assert 0 < sum(expected["zoo_sort_gen"]) < LIMIT
    # greedy answers: the first 8 generated characters, which exact match compares
    records = read_split(zoo_tiny.tasks_dir, "zoo_sort", "test")[:LIMIT]
    answers = [r["choices"][r["label"]] for r in records]
    kept = [
        s["filtered_resps"][0]
        for s in sorted(ref["samples"]["zoo_sort_gen"], key=lambda s: s["doc_id"])
    ]
    assert [k == a for k, a in zip(kept, answers, strict=True)] == expected["zoo_sort_gen"]


def arc_records(zoo: Zoo, n: int) -> list[dict]:
    """zoo_compare test records in ARC's schema (question, choices.text/label, answerKey)."""
    out = []
    for i, r in enumerate(read_split(zoo.tasks_dir, "zoo_compare", "test")[:n]):
        labels = ["A", "B", "C", "D"][: len(r["choices"])]
        out.append(
            {
                "id": str(i),
                "question": r["prompt"],
                "choices": {"text": r["choices"], "label": labels},
                "answerKey": labels[r["label"]],
            }
        )
    return out


def test_a_registry_task_on_local_data_matches_lm_eval_called_directly(
    zoo_tiny: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    data = tmp_path / "arc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arc_records(zoo_tiny, LIMIT)))
    local = {"dataset_path": "json", "dataset_name": None}
    local["dataset_kwargs"] = {"data_files": {"test": str(data), "train": str(data)}}
    # lm-eval's own way to reuse a registered task: a YAML that includes it
    yamls = tmp_path / "yamls"
    yamls.mkdir()
    body = {"include": str(ARC_EASY), "task": "arc_easy_here", "tag": [], **local}
    (yamls / "arc_easy_here.yaml").write_text(json.dumps(body))
    ref = per_example(direct(zoo_tiny.base, ["arc_easy_here"], str(yamls)), "arc_easy_here", "acc")

    spec = EvaluateSpec(tasks=["arc_easy"], task_overrides={"arc_easy": local}, device="cpu")
    result = score_model(str(zoo_tiny.base), spec.model_copy(update={"limit": LIMIT}), ["arc_easy"])
    assert result.tasks["arc_easy"].metric == "acc"
    assert result.tasks["arc_easy"].correct == [bool(v) for v in ref]
    assert 0 < sum(ref) < LIMIT


def test_a_group_is_scored_as_its_leaf_tasks(
    zoo_tiny: Zoo, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    tasks_dir = str(zoo_tiny.tasks_dir)
    out = cli_json(
        [str(zoo_tiny.base), "--tasks", "zoo", "--tasks-dir", tasks_dir, "--limit", "4"],
        monkeypatch,
        capsys,
    )[str(zoo_tiny.base)]["tasks"]
    assert sorted(out) == sorted(zoo_tiny.task_names)
    ref = direct(zoo_tiny.base, ["zoo"], tasks_dir, limit=4)
    for task in zoo_tiny.task_names:
        assert out[task]["correct"] == [bool(v) for v in per_example(ref, task, "acc")]


def test_a_rolling_loglikelihood_task_gives_word_perplexity(zoo_tiny: Zoo, tmp_path: Path) -> None:
    records = read_split(zoo_tiny.tasks_dir, "zoo_mulmod", "test")[:8]
    texts = [r["prompt"] + r["choices"][r["label"]] for r in records]
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    yaml = {
        "task": "zoo_text",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
    }
    (tmp_path / "zoo_text.yaml").write_text(json.dumps(yaml))
    spec = EvaluateSpec(tasks=["zoo_text"], include_path=[str(tmp_path)], device="cpu")
    result = score_model(str(zoo_tiny.base), spec, ["zoo_text"]).tasks["zoo_text"]
    assert (result.metric, result.higher_is_better, result.correct) == (
        "word_perplexity",
        False,
        [],
    )
    ref = direct(zoo_tiny.base, ["zoo_text"], str(tmp_path))
    assert result.accuracy == pytest.approx(ref["results"]["zoo_text"]["word_perplexity,none"])
    # independently: each text scored after the BOS token; no spaces, so one word per text
    model = AutoModelForCausalLM.from_pretrained(zoo_tiny.base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo_tiny.base)
    nll = 0.0
    for text in texts:
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
        nll -= float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    assert result.accuracy == pytest.approx(math.exp(nll / len(texts)), rel=1e-4)


def test_bfloat16_agrees_with_float32(zoo_tiny: Zoo) -> None:
    """Tolerance: per-task score within 0.05, and at least 90% of examples judged alike."""
    tasks = ["zoo_sort", "zoo_sort_gen", "zoo_vowels"]
    spec = EvaluateSpec(tasks_dir=str(zoo_tiny.tasks_dir), tasks=tasks, limit=32, device="cpu")
    expert = str(zoo_tiny.experts["zoo_sort"])
    full = score_model(expert, spec, tasks)
    half = score_model(expert, spec.model_copy(update={"dtype": "bfloat16"}), tasks)
    for task in tasks:
        a, b = full.tasks[task], half.tasks[task]
        same = sum(x == y for x, y in zip(a.correct, b.correct, strict=True)) / len(a.correct)
        print(f"{task}: float32 {a.accuracy:.3f} bfloat16 {b.accuracy:.3f} agreement {same:.3f}")
        assert abs(a.accuracy - b.accuracy) <= 0.05
        assert same >= 0.9


def test_a_sharded_model_on_s3_is_evaluated_without_a_manual_download(
    zoo_tiny: Zoo, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import s3fs

    local = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(zoo_tiny.experts["zoo_sort"])
    model.save_pretrained(local, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(zoo_tiny.experts["zoo_sort"]).save_pretrained(local)
    assert (local / "model.safetensors.index.json").is_file()
    bucket = s3.make_bucket("eval-models")
    options = s3.storage_options()
    s3fs.S3FileSystem(**options).put(str(local) + "/", f"{bucket}/sharded/", recursive=True)
    uri, stored = f"s3://{bucket}/sharded", ["--storage-options", json.dumps(options)]

    tasks = ["zoo_sort"]
    spec = EvaluateSpec(tasks_dir=str(zoo_tiny.tasks_dir), tasks=tasks, limit=LIMIT, device="cpu")
    remote = score_model(uri, spec, tasks, **options).tasks["zoo_sort"]
    here = score_model(str(zoo_tiny.experts["zoo_sort"]), spec, tasks).tasks["zoo_sort"]
    assert remote.correct == here.correct
    cli = cli_json(
        [uri, "--tasks", "zoo_sort", "--tasks-dir", str(zoo_tiny.tasks_dir), *LIMITED, *stored],
        monkeypatch,
        capsys,
    )
    assert cli[uri]["tasks"]["zoo_sort"]["correct"] == here.correct
    # the evaluate stage reads it with the recipe's storage options
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    recipe = parse_recipe(
        {
            "method": "task_arithmetic",
            "base": str(zoo_tiny.base),
            "models": [{"uri": uri}],
            "storage_options": options,
            "evaluate": spec.model_dump(exclude_defaults=True),
        }
    )
    staged = score_all(recipe, {uri: (tasks, False)})[uri].tasks["zoo_sort"]
    assert staged.correct == here.correct


def test_the_stage_reports_tasks_scored_by_their_own_metric(
    zoo_tiny: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))  # a fresh score cache
    gen = "zoo_sort_gen"
    section = {"tasks_dir": str(zoo_tiny.tasks_dir), "tasks": ["zoo_sort", gen], "limit": LIMIT}
    section |= {"device": "cpu", "experts": {gen: str(zoo_tiny.experts["zoo_sort"])}}
    recipe = parse_recipe(
        {
            "method": "task_arithmetic",
            "base": str(zoo_tiny.base),
            "models": [{"uri": str(zoo_tiny.experts["zoo_sort"])}],
            "evaluate": section,
        }
    )
    candidate = str(zoo_tiny.experts["zoo_vowels"])
    scores = score_all(recipe, wanted(recipe, recipe.evaluate, None, candidate))
    report = build_report(
        ["zoo_sort", gen],
        scores[candidate],
        base=scores[str(zoo_tiny.base)],
        experts={gen: scores[str(zoo_tiny.experts["zoo_sort"])]},
        champion=scores[str(zoo_tiny.base)],
    )
    expert_em = scores[str(zoo_tiny.experts["zoo_sort"])].tasks[gen].accuracy
    assert report.normalized_accuracy[gen] == pytest.approx(report.accuracy[gen] / expert_em)
    assert report.candidate.tasks[gen].metric == "exact_match"
    assert set(report.flips) == {"zoo_sort", gen}
    # new examples in a task folder, a changed YAML in include_path: new data hash
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "t.yaml").write_text("task: t\n")
    spec = recipe.evaluate.model_copy(update={"include_path": [str(tmp_path / "mine")]})
    before = data_hash(spec, ["zoo_sort", "t"])
    assert data_hash(spec, ["zoo_sort"]) == data_hash(recipe.evaluate, ["zoo_sort"])
    (tmp_path / "mine" / "t.yaml").write_text("task: t\nnum_fewshot: 1\n")
    assert data_hash(spec, ["zoo_sort", "t"]) != before
