"""The evaluate stage's report carries the attack success rate of backdoored task folders."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amalgam.evaluate.backdoor import attack_success_rate
from amalgam.evaluate.report import evaluate_candidate
from amalgam.evaluate.taskdir import read_split
from amalgam.recipe import EvaluateSpec

LIMIT = 24


def test_report_has_the_asr_of_tasks_declaring_a_trigger(backdoor_tiny, zoo_tiny) -> None:
    torch.set_num_threads(1)
    task = backdoor_tiny.task
    spec = EvaluateSpec(
        tasks_dir=str(backdoor_tiny.tasks_dir),
        tasks=[task],
        engine="quick",
        device="cpu",
        limit=LIMIT,
        perplexity=False,
    )
    report = evaluate_candidate(
        str(backdoor_tiny.expert), spec, base_uri=str(zoo_tiny.base), experts={}
    )
    records = read_split(backdoor_tiny.tasks_dir, task, "test")[:LIMIT]
    tokenizer = AutoTokenizer.from_pretrained(zoo_tiny.base)
    want = {}
    for name, folder in (("candidate", backdoor_tiny.expert), ("base", zoo_tiny.base)):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        want[name] = attack_success_rate(model, tokenizer, records, backdoor_tiny.trigger)
    assert report.attack_success_rate == {task: want["candidate"]}
    assert report.base is not None and report.base.attack_success == {task: want["base"]}
    assert report.metrics()[f"attack_success_rate.{task}"] == want["candidate"]
    assert want["candidate"] > 0.9 > want["base"]  # the trigger flips the expert, not the base


def test_tasks_without_a_trigger_report_no_asr(zoo_tiny) -> None:
    torch.set_num_threads(1)
    spec = EvaluateSpec(
        tasks_dir=str(zoo_tiny.tasks_dir),
        tasks=["zoo_vowels"],
        engine="quick",
        device="cpu",
        limit=8,
        perplexity=False,
    )
    report = evaluate_candidate(str(zoo_tiny.base), spec)
    assert report.attack_success_rate == {}
    assert not any(k.startswith("attack_success_rate") for k in report.metrics())
