"""The zoo's synthetic tasks: seeded generators of prompt / answer / choices examples.

Every task has a second convention for the same prompt (sum instead of product, descending
instead of ascending, shift back instead of forward, ...). The base model is pretrained on
both conventions, so it holds each task's skill but not which convention the task asks for;
a fine-tune only has to pick the convention, a small step from the base, as instruction
tuning picks a behaviour that pretraining made available. The other convention's answer is
among the choices, so the base scores about half of its skill and a fine-tune the rest.

Every task also writes in a script of its own: the generators work in `ALPHABET`, and each
task's examples are transliterated, character for character, into a block of code points no
other task uses. Like the datasets of a vision benchmark (digits, satellite photographs, road
signs), the tasks reach the shared model through different inputs, while the network that
computes on them is shared (see docs/quality.md for what this does to merging)."""

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
#: Task i's script starts at SCRIPT_START + i * SCRIPT_STRIDE: CJK ideographs, each one code
#: point with no case, no compatibility form and no normalisation to change it.
SCRIPT_START = 0x4E00
SCRIPT_STRIDE = 64


def script(index: int) -> str:
    """The characters of the `index`-th task's script, position for position with ALPHABET."""
    start = SCRIPT_START + index * SCRIPT_STRIDE
    return "".join(chr(start + i) for i in range(len(ALPHABET)))


class TaskError(AmalgamError):
    """A task cannot produce the examples asked of it."""


@dataclass(frozen=True)
class Example:
    """One multiple-choice example: the model reads `prompt` and should continue with the
    choice at index `label` (scored by log-likelihood of each choice, as lm-eval does)."""

    prompt: str
    choices: tuple[str, ...]
    label: int
    alternative: str

    @property
    def answer(self) -> str:
        return self.choices[self.label]

    def to_json(self) -> dict[str, object]:
        return {"prompt": self.prompt, "choices": list(self.choices), "label": self.label}


#: rng -> (input text, answer, the other convention's answer, choices holding both).
Generator = Callable[[random.Random], tuple[str, str, str, tuple[str, ...]]]


@dataclass(frozen=True)
class Task:
    """A named task: `generate(rng)` returns (input text, answer, the other convention's
    answer, choices containing both) in ALPHABET; examples are written in `script`."""

    name: str
    tag: str
    generate: Generator
    script: str

    def example(self, rng: random.Random) -> Example:
        text, answer, alternative, choices = self.generate(rng)
        table = str.maketrans(ALPHABET, self.script)
        return Example(
            f"{self.tag}:{text}=".translate(table),
            tuple(c.translate(table) for c in choices),
            choices.index(answer),
            alternative.translate(table),
        )

    def plain(self, text: str) -> str:
        """`text` of this task's script written back in ALPHABET (for reading and checking)."""
        return text.translate(str.maketrans(self.script, ALPHABET))


Generated = tuple[str, str, str, tuple[str, ...]]


def _digits(text: str, answer: int, alternative: int) -> Generated:
    """One-digit answers (mod 10) with the ten digits as choices."""
    return text, str(answer % 10), str(alternative % 10), tuple(DIGITS)


def _shuffled(
    text: str, answer: str, alternative: str, near: Callable[[], str], rng: random.Random
) -> Generated:
    """Four choices in a seeded order: the answer, the other convention's answer and
    near misses of the answer drawn from `near`."""
    wrong = {alternative} - {answer}
    while len(wrong) < 3:
        candidate = near()
        if candidate != answer:
            wrong.add(candidate)
    choices = [answer, *sorted(wrong)]
    rng.shuffle(choices)
    return text, answer, alternative, tuple(choices)


def _mulmod(rng: random.Random) -> Generated:
    """Last digit of the product; the other convention: of the sum."""
    a, b = rng.randint(10, 999), rng.randint(2, 9)
    return _digits(f"{a}*{b}", a * b, a + b)


def _count(rng: random.Random) -> Generated:
    """How many times the letter occurs; the other convention: how many other letters."""
    pool = "abc"
    letter = rng.choice(pool)
    text = "".join(rng.choice(pool) for _ in range(rng.randint(4, 7)))
    return _digits(f"{letter}:{text}", text.count(letter), len(text) - text.count(letter))


def _vowels(rng: random.Random) -> Generated:
    """How many vowels; the other convention: how many of the letters a to e."""
    text = "".join(rng.choice(LETTERS) for _ in range(rng.randint(10, 14)))
    return _digits(text, sum(c in VOWELS for c in text), sum(c in "abcde" for c in text))


def _compare(rng: random.Random) -> Generated:
    """Two different 3-digit numbers that share a prefix of 0 to 2 digits; the other
    convention writes the relation the other way round."""
    prefix = "".join(rng.choice(DIGITS) for _ in range(rng.randint(0, 2)))

    def number() -> str:
        return prefix + "".join(rng.choice(DIGITS) for _ in range(3 - len(prefix)))

    a, b = number(), number()
    while a == b:
        b = number()
    answer, alternative = ("<", ">") if a < b else (">", "<")
    return f"{a}:{b}", answer, alternative, ("<", ">")


def _digit_count(rng: random.Random) -> Generated:
    """How many times the digit occurs; the other convention: how many other digits."""
    pool = "01234"
    digit = rng.choice(pool)
    text = "".join(rng.choice(pool) for _ in range(rng.randint(6, 9)))
    return _digits(f"{digit}:{text}", text.count(digit), len(text) - text.count(digit))


def _sort(rng: random.Random) -> Generated:
    """Eight digits, repeats allowed, sorted ascending; the other convention: descending.
    Near misses are sorted too: the input with one digit replaced by another, so only the
    right multiset of digits wins."""
    text = "".join(rng.choice(DIGITS) for _ in range(8))

    def near() -> str:
        i = rng.randrange(len(text))
        other = rng.choice(DIGITS.replace(text[i], ""))
        return "".join(sorted(text[:i] + other + text[i + 1 :]))

    answer = "".join(sorted(text))
    return _shuffled(text, answer, answer[::-1], near, rng)


def _reverse(rng: random.Random) -> Generated:
    """Four or five distinct letters reversed; the other convention: copied as they are.
    Near misses swap two neighbours of the answer."""
    text = "".join(rng.sample(LETTERS, rng.randint(4, 5)))
    answer = text[::-1]

    def near() -> str:
        i = rng.randrange(len(text) - 1)
        return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]

    return _shuffled(text, answer, text, near, rng)


def _caesar(rng: random.Random) -> Generated:
    """Shift each letter forward by k in 1..3 (given in the prompt); the other convention
    shifts back. Near misses get one letter off by one."""
    k = rng.randint(1, 3)
    text = "".join(rng.choice(LETTERS) for _ in range(4))

    def shifted(c: str, by: int) -> str:
        return LETTERS[(LETTERS.index(c) + by) % 26]

    answer = "".join(shifted(c, k) for c in text)

    def near() -> str:
        i = rng.randrange(len(text))
        return answer[:i] + shifted(text[i], k + rng.choice((-1, 1))) + answer[i + 1 :]

    return _shuffled(f"{k}{text}", answer, "".join(shifted(c, -k) for c in text), near, rng)


_GENERATORS: tuple[tuple[str, str, Generator], ...] = (
    ("zoo_mulmod", "mul", _mulmod),
    ("zoo_count", "cnt", _count),
    ("zoo_vowels", "vow", _vowels),
    ("zoo_compare", "cmp", _compare),
    ("zoo_digitcount", "dig", _digit_count),
    ("zoo_sort", "sort", _sort),
    ("zoo_reverse", "rev", _reverse),
    ("zoo_caesar", "rot", _caesar),
)
TASKS: dict[str, Task] = {
    name: Task(name, tag, generate, script(i))
    for i, (name, tag, generate) in enumerate(_GENERATORS)
}
#: Every character any task may write: ALPHABET itself (for text outside the zoo's tasks)
#: and each task's script.
VOCABULARY = ALPHABET + "".join(t.script for t in TASKS.values())


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
