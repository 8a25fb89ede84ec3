"""Tasks whose answers are written in a script the base tokenizer lacks, and the tokenizer and
model growth that gives a model that script as added tokens.

A token task keeps the prompts of one zoo task (in that task's script, which the base reads)
and writes every choice in a new script: a block of CJK code points after the zoo's own task
scripts (`amalgam.zoo.tasks.script` past the last task). An expert fine-tuned on it has to
learn the new tokens' embedding and LM-head rows, so two such experts with different scripts
have different vocabularies, as community fine-tunes that add tokens do."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING

from amalgam.zoo.tasks import TASKS, Example, make_splits, script

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


def new_script(key_index: int) -> str:
    """The `key_index`-th new script: the block after the zoo tasks' scripts and earlier ones."""
    return script(len(TASKS) + key_index)


def token_task_name(task: str, key: str) -> str:
    """The task folder of `task` answered in the script of token expert `key`."""
    return f"{task}_tok_{key}"


def rewrite(example: Example, source: str, target: str) -> Example:
    """`example` with its choices (and other-convention answer) moved from script `source` to
    `target`, character for character; the prompt is unchanged."""
    table = str.maketrans(source, target)
    return replace(
        example,
        choices=tuple(c.translate(table) for c in example.choices),
        alternative=example.alternative.translate(table),
    )


def token_splits(
    task: str, target: str, sizes: dict[str, int], seed: int
) -> dict[str, list[Example]]:
    """The zoo's splits of `task` (same prompts, same seed) with answers in script `target`."""
    source = TASKS[task].script
    return {
        split: [rewrite(e, source, target) for e in examples]
        for split, examples in make_splits(TASKS[task], sizes, seed).items()
    }


def with_tokens(tokenizer: PreTrainedTokenizerFast, scripts: list[str]) -> PreTrainedTokenizerFast:
    """A copy of the char-level `tokenizer` with every character of `scripts` added, in order,
    as one token each (ids after the base vocabulary)."""
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens([c for text in scripts for c in text])
    return grown


def grow_embeddings(model: PreTrainedModel, size: int) -> None:
    """Grow the input embedding and LM head (untied) of `model` in place to `size` rows; every
    new row is the mean of the model's existing rows of that table (no randomness)."""
    import torch  # lazy: torch, which a cached zoo does not need

    old = model.get_input_embeddings().weight.shape[0]
    means = [
        table.weight.detach().mean(0)
        for table in (model.get_input_embeddings(), model.get_output_embeddings())
    ]
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        for table, mean in zip(
            (model.get_input_embeddings(), model.get_output_embeddings()), means, strict=True
        ):
            table.weight[old:] = mean
