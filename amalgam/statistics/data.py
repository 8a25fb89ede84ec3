"""Examples for statistics: a task folder's validation split or any jsonl of text records."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from amalgam import storage
from amalgam.errors import StatisticsError

SPLIT_FILE = "validation.jsonl"  # what a zoo / lm-eval task folder contributes


@dataclass(frozen=True)
class Example:
    """``prompt`` is context only; ``answer`` is the continuation a Fisher scores (a ``text``
    record is all answer). Gram matrices see every token of both."""

    prompt: str
    answer: str


def _example(record: Any, where: str) -> Example:
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return Example("", record["text"])
        prompt = record.get("prompt")
        if isinstance(prompt, str) and isinstance(record.get("answer"), str):
            return Example(prompt, record["answer"])
        choices, label = record.get("choices"), record.get("label")
        if (
            isinstance(prompt, str)
            and isinstance(choices, list)
            and isinstance(label, int)
            and 0 <= label < len(choices)
            and isinstance(choices[label], str)
        ):
            return Example(prompt, choices[label])
    raise StatisticsError(
        f"{where}: a record needs 'text', or 'prompt' and 'answer', or 'prompt', 'choices' and "
        "a valid 'label'"
    )


def load_examples(path: str, **storage_options: Any) -> tuple[list[Example], str]:
    """The examples of ``path`` and their content hash.

    ``path`` is a jsonl file, or a task folder (zoo / lm-eval layout) whose ``validation.jsonl``
    is read. The hash is the sha256 of the examples themselves (canonical JSON), so the same
    records give the same hash wherever they lie.
    """
    fs, p = storage.resolve(path, **storage_options)
    if fs.isdir(p):
        p = storage.join(p, SPLIT_FILE)
        if not fs.isfile(p):
            raise StatisticsError(f"{path}: a folder, but it holds no {SPLIT_FILE}")
    elif not fs.isfile(p):
        raise StatisticsError(f"{path}: no such data file or task folder")
    label = storage.full_uri(fs, p)
    examples: list[Example] = []
    try:
        with fs.open(p, "r") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise StatisticsError(f"{label}:{lineno}: not valid JSON ({exc})") from None
                examples.append(_example(record, f"{label}:{lineno}"))
    except (OSError, UnicodeDecodeError) as exc:
        raise StatisticsError(f"{label}: cannot read ({exc})") from None
    if not examples:
        raise StatisticsError(f"{label}: holds no records")
    body = json.dumps([[e.prompt, e.answer] for e in examples], ensure_ascii=False)
    return examples, "sha256:" + hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example; positions ``start`` onward are the scored tokens."""

    ids: tuple[int, ...]
    start: int


def encode(tokenizer: Any, examples: list[Example], max_length: int) -> list[Encoded]:
    """Prompt and answer encoded separately without special tokens (as the evaluator does),
    joined, and cut to the last ``max_length`` tokens. The first token of a ``text`` record is
    context only (nothing predicts it)."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    out = []
    for e in examples:
        prompt, answer = ids(e.prompt), ids(e.answer)
        seq = prompt + answer
        start = max(1, len(prompt))
        cut = max(0, len(seq) - max_length)
        out.append(Encoded(tuple(seq[cut:]), max(1, start - cut)))
    return out
