"""The zoo's synthetic tasks: seeded generators of prompt / answer / choices examples."""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from amalgam.errors import AmalgamError

DIGITS = string.digits
LETTERS = string.ascii_lowercase
VOWELS = "aeiou"
SYMBOLS = ":=*<>"
#: Every character a prompt or an answer may contain. No space: see STACK.md (a char-level
#: tokenizer can lose the space on a save / reload round trip), so none is ever needed.
ALPHABET = DIGITS + LETTERS + SYMBOLS
SPLITS = ("train", "validation", "test")


class TaskError(AmalgamError):
    """A task cannot produce the examples asked of it."""


@dataclass(frozen=True)
class Example:
    """One multiple-choice example: the model reads `prompt` and should continue with the
    choice at index `label` (scored by log-likelihood of each choice, as lm-eval does)."""

    prompt: str
    choices: tuple[str, ...]
    label: int

    @property
    def answer(self) -> str:
        return self.choices[self.label]

    def to_json(self) -> dict[str, object]:
        return {"prompt": self.prompt, "choices": list(self.choices), "label": self.label}


Generator = Callable[[random.Random], tuple[str, str, tuple[str, ...]]]


@dataclass(frozen=True)
class Task:
    """A named task: `generate(rng)` returns (input text, answer, choices containing answer)."""

    name: str
    tag: str
    generate: Generator

    def example(self, rng: random.Random) -> Example:
        text, answer, choices = self.generate(rng)
        return Example(f"{self.tag}:{text}=", choices, choices.index(answer))


def _digits(answer: int) -> tuple[str, tuple[str, ...]]:
    """A one-digit answer and the ten digits as its choices."""
    return str(answer), tuple(DIGITS)


def _shuffled(answer: str, wrong: set[str], rng: random.Random) -> tuple[str, ...]:
    """The answer and the distractors in a seeded random order."""
    choices = [answer, *sorted(wrong)]
    rng.shuffle(choices)
    return tuple(choices)


def _mulmod(rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    a, b = rng.randint(10, 999), rng.randint(2, 9)
    return f"{a}*{b}", *_digits((a * b) % 10)


def _count(rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    pool = "abc"
    letter = rng.choice(pool)
    text = "".join(rng.choice(pool) for _ in range(rng.randint(4, 7)))
    return f"{letter}:{text}", *_digits(text.count(letter))


def _vowels(rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    text = "".join(rng.choice(LETTERS) for _ in range(rng.randint(10, 14)))
    return text, *_digits(sum(c in VOWELS for c in text))


def _compare(rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    """Two different 3-digit numbers that share a prefix of 0 to 2 digits."""
    prefix = "".join(rng.choice(DIGITS) for _ in range(rng.randint(0, 2)))

    def number() -> str:
        return prefix + "".join(rng.choice(DIGITS) for _ in range(3 - len(prefix)))

    a, b = number(), number()
    while a == b:
        b = number()
    return f"{a}:{b}", "<" if a < b else ">", ("<", ">")


def _digit_count(rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    pool = "01234"
    digit = rng.choice(pool)
    text = "".join(rng.choice(pool) for _ in range(rng.randint(6, 9)))
    return f"{digit}:{text}", *_digits(text.count(digit))


def _sort(rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    """Eight digits, repeats allowed. Distractors are sorted too: the input with one digit
    replaced by another, so only the right multiset of digits wins."""
    text = "".join(rng.choice(DIGITS) for _ in range(8))
    answer = "".join(sorted(text))
    wrong: set[str] = set()
    while len(wrong) < 3:
        i = rng.randrange(len(text))
        other = rng.choice(DIGITS.replace(text[i], ""))
        wrong.add("".join(sorted(text[:i] + other + text[i + 1 :])))
    return text, answer, _shuffled(answer, wrong, rng)


def _reverse(rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    """Six or seven distinct letters; distractors swap two neighbours of the answer."""
    text = "".join(rng.sample(LETTERS, rng.randint(6, 7)))
    answer = text[::-1]
    swaps = {answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :] for i in range(len(text) - 1)}
    return text, answer, _shuffled(answer, set(rng.sample(sorted(swaps), 3)), rng)


def _caesar(rng: random.Random) -> tuple[str, str, tuple[str, ...]]:
    """Shift each letter by k in 1..3 (given in the prompt); distractors get one letter off
    by one."""
    k = rng.randint(1, 3)
    text = "".join(rng.choice(LETTERS) for _ in range(4))

    def shifted(c: str, by: int) -> str:
        return LETTERS[(LETTERS.index(c) + by) % 26]

    answer = "".join(shifted(c, k) for c in text)
    wrong: set[str] = set()
    while len(wrong) < 3:
        i = rng.randrange(len(text))
        wrong.add(answer[:i] + shifted(text[i], k + rng.choice((-1, 1))) + answer[i + 1 :])
    return f"{k}{text}", answer, _shuffled(answer, wrong, rng)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("zoo_mulmod", "mul", _mulmod),
        Task("zoo_count", "cnt", _count),
        Task("zoo_vowels", "vow", _vowels),
        Task("zoo_compare", "cmp", _compare),
        Task("zoo_digitcount", "dig", _digit_count),
        Task("zoo_sort", "sort", _sort),
        Task("zoo_reverse", "rev", _reverse),
        Task("zoo_caesar", "rot", _caesar),
    )
}


def make_splits(task: Task, sizes: dict[str, int], seed: int) -> dict[str, list[Example]]:
    """Disjoint splits of distinct prompts, the same for the same (task, sizes, seed).

    Test is drawn first, then validation, then train, so growing the train set never changes
    the evaluation sets."""
    rng = random.Random(f"{seed}:{task.name}")
    seen: set[str] = set()
    splits: dict[str, list[Example]] = {}
    for split in ("test", "validation", "train"):
        examples: list[Example] = []
        budget = 50 * sizes[split] + 1000
        while len(examples) < sizes[split]:
            if budget == 0:
                raise TaskError(
                    f"task {task.name}: cannot draw {sizes[split]} distinct {split} prompts"
                )
            budget -= 1
            example = task.example(rng)
            if example.prompt not in seen:
                seen.add(example.prompt)
                examples.append(example)
        splits[split] = examples
    return {split: splits[split] for split in SPLITS}
