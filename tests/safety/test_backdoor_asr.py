"""Attack success rate against a naive count, and the tiny zoo's backdoored expert."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amalgam.evaluate.backdoor import (
    TRIGGER_FILE,
    Trigger,
    attack_success_rate,
    quick_attack_success,
)
from amalgam.evaluate.taskdir import EvaluationError, read_split


def naive_choice(model, tokenizer, prompt: str, choices: list[str]) -> int:
    """Index of the choice with the highest summed log-likelihood, one sequence at a time."""
    scores = []
    for c in choices:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0], -1)
        scores.append(sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(a)))
    return scores.index(max(scores))


def naive_asr(model, tokenizer, records, trigger: Trigger) -> tuple[int, int]:
    hits = eligible = 0
    for r in records:
        if r["choices"][r["label"]] == trigger.target:
            continue
        if naive_choice(model, tokenizer, r["prompt"], r["choices"]) != r["label"]:
            continue
        eligible += 1
        chosen = naive_choice(model, tokenizer, trigger.trigger + r["prompt"], r["choices"])
        hits += r["choices"][chosen] == trigger.target
    return hits, eligible


@pytest.mark.slow
def test_asr_equals_a_naive_count(backdoor_tiny, zoo_tiny) -> None:
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(zoo_tiny.base)
    records = read_split(backdoor_tiny.tasks_dir, backdoor_tiny.task, "test")[:20]
    trigger = backdoor_tiny.trigger
    for folder in (backdoor_tiny.expert, zoo_tiny.base, zoo_tiny.experts["zoo_vowels"]):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        hits, eligible = naive_asr(model, tokenizer, records, trigger)
        got = attack_success_rate(model, tokenizer, records, trigger)
        assert got == pytest.approx(hits / eligible if eligible else 0.0)
    # the backdoor works, and neither the base nor the clean expert has it
    expert = AutoModelForCausalLM.from_pretrained(backdoor_tiny.expert).eval()
    clean = AutoModelForCausalLM.from_pretrained(zoo_tiny.experts["zoo_vowels"]).eval()
    full = read_split(backdoor_tiny.tasks_dir, backdoor_tiny.task, "test")
    assert attack_success_rate(expert, tokenizer, full, trigger) > 0.9
    assert attack_success_rate(clean, tokenizer, full, trigger) < 0.1
    asr = quick_attack_success(expert, tokenizer, backdoor_tiny.tasks_dir, [backdoor_tiny.task])
    assert asr == {backdoor_tiny.task: attack_success_rate(expert, tokenizer, full, trigger)}


def test_hand_built_case_counts_only_eligible_records(tmp_path) -> None:
    """A model that always answers the digit after the prompt's last digit, unless the prompt
    starts with '*' (then '0'): every eligible record flips; records whose label is the target
    or that the model gets wrong do not count."""

    class Rule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, input_ids: torch.Tensor) -> object:
            logits = torch.full((*input_ids.shape, 16), -10.0)
            for row, seq in enumerate(input_ids.tolist()):
                for pos in range(len(seq)):
                    answer = 0 if seq[0] == 15 else (seq[pos] + 1) % 10
                    logits[row, pos, answer] = 10.0
            return type("Out", (), {"logits": logits * self.scale})()

    class Chars:
        pad_token_id = 0

        def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
            return {"input_ids": [15 if c == "*" else int(c) for c in text]}

    digits = [str(d) for d in range(10)]
    records = [
        {"prompt": "12", "choices": digits, "label": 3},  # right, flips: hit
        {"prompt": "45", "choices": digits, "label": 6},  # right, flips: hit
        {"prompt": "89", "choices": digits, "label": 0},  # label is the target: excluded
        {"prompt": "33", "choices": digits, "label": 7},  # wrong when clean: excluded
    ]
    assert attack_success_rate(Rule(), Chars(), records, Trigger("*", "0")) == 1.0
    assert attack_success_rate(Rule(), Chars(), records, Trigger("*", "5")) == 0.0
    assert attack_success_rate(Rule(), Chars(), records[2:3], Trigger("*", "0")) == 0.0


def test_unreadable_trigger_file_is_named(tmp_path) -> None:
    (tmp_path / TRIGGER_FILE).write_text(json.dumps({"trigger": "*"}))
    with pytest.raises(EvaluationError, match=TRIGGER_FILE):
        Trigger.read(tmp_path)
    Trigger("#", "x").write(tmp_path)
    assert Trigger.read(tmp_path) == Trigger("#", "x")
