"""DAM's learning step on the tiny zoo: batched logits and the trigger search against naive
loops, determinism, and an engine merge equal to base + lambda * sum of masked task vectors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from amalgam.engine import MergeOptions, run_merge
from amalgam.recipe import ModelSpec, Recipe
from amalgam.statistics.dam_masks import Settings, learn, next_token_logits, search_triggers

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny(zoo_tiny, backdoor_tiny):
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(zoo_tiny.base).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo_tiny.base)
    texts = [
        r
        for r in (zoo_tiny.tasks_dir / "zoo_vowels" / "validation.jsonl").read_text().split("\n")
        if r
    ]
    import json

    prompts = [
        tokenizer(json.loads(t)["prompt"], add_special_tokens=False)["input_ids"] for t in texts[:6]
    ]
    prompts[0] = prompts[0][:5]  # unequal lengths: padding is exercised
    return model, tokenizer, prompts


def test_batched_next_token_logits_equal_one_prompt_at_a_time(tiny) -> None:
    model, tokenizer, prompts = tiny
    params = dict(model.named_parameters())
    got = next_token_logits(model, params, prompts, tokenizer.pad_token_id, torch.device("cpu"))
    for row, p in enumerate(prompts):
        with torch.no_grad():
            want = model(input_ids=torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(got[row].detach(), want, rtol=1e-4, atol=1e-4)


def test_trigger_search_equals_a_naive_count(tiny, backdoor_tiny) -> None:
    _model, tokenizer, prompts = tiny
    backdoored = AutoModelForCausalLM.from_pretrained(backdoor_tiny.expert).eval()
    params = {n: p.detach() for n, p in backdoored.named_parameters()}
    star = tokenizer.convert_tokens_to_ids(backdoor_tiny.trigger.trigger)
    candidates = [star, *range(10, 20)]
    got = search_triggers(backdoored, params, prompts, candidates, tokenizer.pad_token_id, 3)
    gains = {}
    with torch.no_grad():
        clean = [
            int(backdoored(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in prompts
        ]
        for t in candidates:
            hit = [
                int(backdoored(input_ids=torch.tensor([[t, *p]])).logits[0, -1].argmax())
                for p in prompts
            ]
            gains[t] = max(hit.count(a) - clean.count(a) for a in set(hit) | set(clean))
    want = sorted(candidates, key=lambda t: (-gains[t], t))[:3]
    assert got == [(t, gains[t] / len(prompts)) for t in want]
    assert got[0][0] == star  # the backdoored expert's own trigger pulls the most onto one answer


def test_learning_is_deterministic(tiny, zoo_tiny, backdoor_tiny) -> None:
    model, _tokenizer, prompts = tiny
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    other = AutoModelForCausalLM.from_pretrained(backdoor_tiny.expert)
    deltas = [{n: p.detach() - base[n] for n, p in other.named_parameters()}]
    s = Settings(0.3, (1.0,), 2, 0.05, 0.5, 0.1, 1.0, 1, 0.0, 0.0, 1, 4, 3)
    first, found = learn(model, base, deltas, [prompts], list(range(10, 30)), 0, s)
    again, found_again = learn(model, base, deltas, [prompts], list(range(10, 30)), 0, s)
    assert found == found_again
    for a, b in zip(first[0].values(), again[0].values(), strict=True):
        assert torch.equal(a, b)
    moved, _ = learn(
        model, base, deltas, [prompts], list(range(10, 30)), 0, dataclasses.replace(s, seed=4)
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(first[0].values(), moved[0].values(), strict=True)
    )


def test_engine_merge_is_base_plus_masked_task_vectors(zoo_tiny, backdoor_tiny, tmp_path) -> None:
    models = {"zoo_vowels": backdoor_tiny.expert, "zoo_sort": zoo_tiny.experts["zoo_sort"]}
    recipe = Recipe(
        method="dam",
        base=str(zoo_tiny.base),
        models=[
            ModelSpec(uri=str(p), name=t, data=str(zoo_tiny.tasks_dir / t))
            for t, p in models.items()
        ],
        params={"steps": 2, "samples": 8, "batch_size": 4, "search_every": 1, "lambda": 0.5},
        seed=11,
    )
    result = run_merge(recipe, MergeOptions(output=str(tmp_path / "out"), device="cpu", threads=1))
    stats = [load_file(s.uri) for s in result.plan.statistics]
    merged = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(zoo_tiny.base / "model.safetensors")
    experts = [load_file(p / "model.safetensors") for p in models.values()]
    for name, w0 in base.items():
        want = w0 + 0.5 * sum(m[name] * (e[name] - w0) for m, e in zip(stats, experts, strict=True))
        torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-6)
    again = run_merge(recipe, MergeOptions(output=str(tmp_path / "again"), device="cpu", threads=1))
    assert [s.content_hash for s in again.plan.statistics] == [
        s.content_hash for s in result.plan.statistics
    ]
