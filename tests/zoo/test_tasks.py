"""The synthetic tasks: answers checked by independent solvers, splits disjoint and seeded."""

from __future__ import annotations

import random

import pytest

from amalgam.zoo.tasks import ALPHABET, SPLITS, TASKS, VOCABULARY, TaskError, make_splits

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def solve(task: str, text: str) -> str:
    """The right answer, computed from the prompt's text alone."""
    if task == "zoo_mulmod":
        a, b = text.split("*")
        return str(int(a) * int(b) % 10)
    if task == "zoo_count":
        letter, word = text.split(":")
        return str(word.count(letter))
    if task == "zoo_vowels":
        return str(len([c for c in text if c in "aeiou"]))
    if task == "zoo_compare":
        a, b = text.split(":")
        return "<" if int(a) < int(b) else ">"
    if task == "zoo_digitcount":
        digit, digits = text.split(":")
        return str(digits.count(digit))
    if task == "zoo_sort":
        return "".join(sorted(text))
    if task == "zoo_reverse":
        return "".join(reversed(text))
    if task == "zoo_caesar":
        k = int(text[0])
        return "".join(chr((ord(c) - ord("a") + k) % 26 + ord("a")) for c in text[1:])
    raise AssertionError(f"no solver for {task}")


def solve_other(task: str, text: str) -> str:
    """The other convention's answer, computed from the prompt's text alone."""
    if task == "zoo_mulmod":
        a, b = text.split("*")
        return str((int(a) + int(b)) % 10)
    if task in ("zoo_count", "zoo_digitcount"):
        symbol, rest = text.split(":")
        return str(len(rest) - rest.count(symbol))
    if task == "zoo_vowels":
        return str(len([c for c in text if c in "abcde"]) % 10)
    if task == "zoo_compare":
        return {"<": ">", ">": "<"}[solve(task, text)]
    if task == "zoo_sort":
        return "".join(sorted(text, reverse=True))
    if task == "zoo_reverse":
        return text
    if task == "zoo_caesar":
        k = int(text[0])
        return "".join(chr((ord(c) - ord("a") - k) % 26 + ord("a")) for c in text[1:])
    raise AssertionError(f"no solver for {task}")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_answers_are_right_and_choices_well_formed(name: str) -> None:
    task = TASKS[name]
    rng = random.Random(7)
    for _ in range(300):
        example = task.example(rng)
        written = "".join((example.prompt, *example.choices, example.alternative))
        assert set(written) <= set(task.script)
        tag, rest = task.plain(example.prompt).split(":", 1)
        assert tag == task.tag and rest.endswith("=")
        assert task.plain(example.answer) == solve(name, rest[:-1])
        assert task.plain(example.alternative) == solve_other(name, rest[:-1])
        assert example.alternative in example.choices
        assert len(set(example.choices)) == len(example.choices) >= 2


def test_each_task_writes_in_a_script_of_its_own() -> None:
    scripts = [set(t.script) for t in TASKS.values()]
    assert all(len(s) == len(ALPHABET) for s in scripts)
    assert sum(len(s) for s in scripts) == len(set().union(*scripts))  # pairwise disjoint
    assert not set(ALPHABET) & set().union(*scripts)
    assert set(VOCABULARY) == set(ALPHABET).union(*scripts)
    task = TASKS["zoo_caesar"]
    assert task.plain("".join(task.script)) == ALPHABET


def test_at_least_eight_tasks_with_distinct_tags() -> None:
    assert len(TASKS) >= 8
    assert len({t.tag for t in TASKS.values()}) == len(TASKS)


def test_splits_are_disjoint_sized_and_seeded() -> None:
    sizes = {"train": 300, "validation": 40, "test": 50}
    for task in TASKS.values():
        splits = make_splits(task, sizes, seed=3)
        assert tuple(splits) == SPLITS
        prompts = {s: {e.prompt for e in examples} for s, examples in splits.items()}
        assert {s: len(p) for s, p in prompts.items()} == sizes
        assert not prompts["train"] & prompts["test"]
        assert not prompts["train"] & prompts["validation"]
        assert not prompts["validation"] & prompts["test"]
        assert make_splits(task, sizes, seed=3) == splits
        assert make_splits(task, sizes, seed=4) != splits


def test_evaluation_sets_do_not_depend_on_the_train_size() -> None:
    task = TASKS["zoo_sort"]
    small = make_splits(task, {"train": 10, "validation": 20, "test": 20}, seed=0)
    large = make_splits(task, {"train": 500, "validation": 20, "test": 20}, seed=0)
    assert small["test"] == large["test"] and small["validation"] == large["validation"]


def test_too_many_examples_for_the_input_space_is_an_error() -> None:
    with pytest.raises(TaskError, match="zoo_mulmod"):  # only 990 x 8 distinct prompts
        make_splits(TASKS["zoo_mulmod"], {"train": 8000, "validation": 1, "test": 1}, seed=0)
