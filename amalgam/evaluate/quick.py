"""Fast in-process multiple-choice accuracy, scored the way lm-eval's `acc` scores it.

lm-eval spends seconds per call on task loading and request bookkeeping; this scores an
in-memory model on the zoo's jsonl splits directly: the choice with the highest summed
log-likelihood after the prompt wins (ties go to the first choice, like `numpy.argmax`).
`tests/evaluate` checks that it agrees with `evaluate_model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amalgam.evaluate.taskdir import read_split

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def choice_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, Any]],
    *,
    batch_size: int = 512,
) -> float:
    """Share of records whose `label` choice has the highest log-likelihood after `prompt`."""
    correct = choice_correct(model, tokenizer, records, batch_size=batch_size)
    return sum(correct) / len(correct) if correct else 0.0


def choice_correct(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, Any]],
    *,
    batch_size: int = 512,
) -> list[bool]:
    """Per record: does its `label` choice have the highest log-likelihood after `prompt`?"""
    import torch  # lazy: importing amalgam.evaluate must not load torch (tested)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # One forward pass per request: (token ids, [(start of a choice, its ids)]). When every
    # choice is one token, the prompt alone is enough to score them all.
    requests: list[tuple[list[int], list[tuple[int, list[int]]]]] = []
    for record in records:
        prompt = ids(record["prompt"])
        answers = [ids(choice) for choice in record["choices"]]
        if all(len(answer) == 1 for answer in answers):
            requests.append((prompt, [(len(prompt), answer) for answer in answers]))
        else:
            requests += [(prompt + answer, [(len(prompt), answer)]) for answer in answers]
    scores: list[float] = []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id or 0
    with torch.inference_mode():
        for first in range(0, len(requests), batch_size):
            chunk = requests[first : first + batch_size]
            batch = torch.full((len(chunk), max(len(s) for s, _ in chunk)), pad, dtype=torch.long)
            for row, (seq, _) in enumerate(chunk):
                batch[row, : len(seq)] = torch.tensor(seq)
            logprobs = torch.log_softmax(model(input_ids=batch.to(device)).logits.float(), -1)
            for row, (_, targets) in enumerate(chunk):
                for start, answer in targets:
                    positions = torch.arange(start - 1, start - 1 + len(answer), device=device)
                    tokens = torch.tensor(answer, device=device)
                    scores.append(logprobs[row, positions, tokens].sum().item())
    correct, offset = [], 0
    for record in records:
        options = scores[offset : offset + len(record["choices"])]
        correct.append(options.index(max(options)) == record["label"])
        offset += len(record["choices"])
    return correct


def quick_evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks_dir: Path,
    tasks: Sequence[str],
    *,
    split: str = "test",
    limit: int | None = None,
) -> dict[str, float]:
    """Task -> accuracy of an in-memory model on the first `limit` records of each split."""
    return {
        task: choice_accuracy(model, tokenizer, read_split(tasks_dir, task, split)[:limit])
        for task in tasks
    }
