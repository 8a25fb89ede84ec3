"""Negative log-likelihood of a model on a fixed text set (for the perplexity collapse check).

Every sequence is scored on its own (no packing), padding masked. The text set of a task
folder is each record's correct choice after its prompt, and only the choice's tokens are
scored: a fine-tuned model is trained on answers, and its predictions of prompt tokens (which
no fine-tune or pretraining on prompt/answer pairs constrains) would make the ratio noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from amalgam.evaluate.taskdir import read_split

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def task_texts(
    tasks_dir: Path, tasks: Sequence[str], split: str, limit: int | None
) -> list[tuple[str, str]]:
    """(prompt, correct choice) of the first ``limit`` records of each task's ``split``."""
    return [
        (record["prompt"], record["choices"][record["label"]])
        for task in tasks
        for record in read_split(tasks_dir, task, split)[:limit]
    ]


def token_ids(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> list[tuple[list[int], int]]:
    """(prompt + continuation ids, index of the first continuation token) of each pair."""
    sequences = []
    for prompt, continuation in pairs:
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        sequences.append(
            (head + tokenizer(continuation, add_special_tokens=False)["input_ids"], len(head))
        )
    return sequences


def sequence_nll(
    model: torch.nn.Module, sequences: Sequence[tuple[Sequence[int], int]], *, batch_size: int = 64
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, number of scored tokens) over (ids, start)
    sequences: the tokens from index ``start`` on (at least 1) are scored, each predicted
    from the tokens before it."""
    import torch  # lazy: importing amalgam.evaluate must not load torch (tested)

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for first in range(0, len(sequences), batch_size):
            chunk = [(list(s), max(start, 1)) for s, start in sequences[first : first + batch_size]]
            chunk = [(s, start) for s, start in chunk if len(s) > start]
            if not chunk:
                continue
            width = max(len(s) for s, _ in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            scored = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, (seq, start) in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
                scored[row, start : len(seq)] = True
            ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], -1)
            picked = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
            keep = scored[:, 1:]
            total -= float(picked[keep].sum())
            count += int(keep.sum())
    return total, count
