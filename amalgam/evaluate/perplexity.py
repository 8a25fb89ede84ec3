"""Negative log-likelihood of a model on a fixed text set (for the perplexity collapse check).

Every text is scored on its own (no packing): each token after the first is predicted from
the tokens before it, padding is masked. The text set of a task folder is each record's
prompt followed by its correct choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from amalgam.evaluate.taskdir import read_split

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def task_texts(tasks_dir: Path, tasks: Sequence[str], split: str, limit: int | None) -> list[str]:
    """Prompt + correct choice of the first ``limit`` records of each task's ``split``."""
    texts = []
    for task in tasks:
        for record in read_split(tasks_dir, task, split)[:limit]:
            texts.append(record["prompt"] + record["choices"][record["label"]])
    return texts


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def sequence_nll(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, batch_size: int = 64
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, number of predicted tokens) over sequences."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for first in range(0, len(sequences), batch_size):
            chunk = [list(s) for s in sequences[first : first + batch_size] if len(s) > 1]
            if not chunk:
                continue
            width = max(len(s) for s in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], -1)
            picked = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
            keep = mask[:, 1:].bool()
            total -= float(picked[keep].sum())
            count += int(keep.sum())
    return total, count
