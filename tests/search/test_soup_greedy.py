"""Greedy soup: the order and acceptance rule on a hand-worked case, then on the tiny zoo the
individual scores, the soup's score and the merged soup against independent computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from amalgam.errors import RecipeError
from amalgam.recipe import parse_recipe
from amalgam.search.soup import greedy_soup, run_soup


def test_models_are_tried_best_first_and_kept_when_the_soup_does_not_get_worse() -> None:
    # individual scores: b first; c and d tie at 0.6 and keep the recipe's order (c, d); a last
    individual = {"a": 0.5, "b": 0.7, "c": 0.6, "d": 0.6}
    table = {("b", "c"): 0.72, ("b", "c", "d"): 0.71, ("a", "b", "c"): 0.72}
    calls: list[list[str]] = []

    def soup_score(models: list[str]) -> float:
        calls.append(models)
        return table[tuple(sorted(models))]

    result = greedy_soup(individual, soup_score)
    assert calls == [["b", "c"], ["b", "c", "d"], ["b", "c", "a"]]
    # c raises the score (0.72 >= 0.7); d lowers it (0.71): left out; a keeps it (0.72 >= 0.72,
    # the paper's >=): kept
    assert result.ingredients == ["b", "c", "a"]
    assert result.score == 0.72
    assert [(s.model, s.accepted) for s in result.steps] == [
        ("b", True),
        ("c", True),
        ("d", False),
        ("a", True),
    ]


def test_a_soup_of_another_method_or_without_tasks_is_refused(zoo_tiny) -> None:
    data = {
        "method": "ties",
        "base": str(zoo_tiny.base),
        "models": [{"uri": str(zoo_tiny.experts["zoo_sort"])}],
    }
    with pytest.raises(RecipeError, match=r"method: a soup is a uniform average \(linear\)"):
        run_soup(parse_recipe(data))
    data.update(method="linear", evaluate={"tasks_dir": str(zoo_tiny.tasks_dir)})
    with pytest.raises(RecipeError, match=r"evaluate\.tasks: name the tasks"):
        run_soup(parse_recipe(data))


@pytest.mark.slow
def test_greedy_soup_on_the_zoo_matches_independent_scores(zoo_tiny, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amalgam.evaluate.quick import quick_evaluate

    experts = ["zoo_mulmod", "zoo_compare", "zoo_sort"]
    tasks = ["zoo_mulmod", "zoo_compare"]
    recipe = parse_recipe(
        {
            "method": "linear",
            "models": [{"uri": str(zoo_tiny.experts[e])} for e in experts],
            "evaluate": {"tasks_dir": str(zoo_tiny.tasks_dir), "tasks": tasks, "engine": "quick"},
            "output": str(tmp_path / "soup"),
        }
    )
    result = run_soup(recipe, limit=16, output=tmp_path / "soup.yaml")
    tokenizer = AutoTokenizer.from_pretrained(zoo_tiny.experts[experts[0]])

    def score(state: dict[str, torch.Tensor]) -> float:
        model = AutoModelForCausalLM.from_pretrained(zoo_tiny.base)
        model.load_state_dict(state)
        accs = quick_evaluate(
            model, tokenizer, zoo_tiny.tasks_dir, tasks, split="validation", limit=16
        )
        return sum(accs.values()) / len(accs)

    states = {e: load_file(str(zoo_tiny.experts[e] / "model.safetensors")) for e in experts}
    alone = {e: score(states[e]) for e in experts}
    assert {s.model: s.individual for s in result.steps} == pytest.approx(alone)
    assert [s.model for s in result.steps] == sorted(experts, key=lambda e: -alone[e])

    def average(models: list[str]) -> dict[str, torch.Tensor]:
        return {n: sum(states[m][n] for m in models) / len(models) for n in states[models[0]]}

    for step in result.steps[1:]:
        tried = [s.model for s in result.steps[: result.steps.index(step)] if s.accepted]
        assert step.score == pytest.approx(score(average([*tried, step.model])), abs=1e-9)
    merged = load_file(str(tmp_path / "soup" / "model.safetensors"))
    naive = average(result.ingredients)
    for name, tensor in naive.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6)
    written = parse_recipe(yaml.safe_load((tmp_path / "soup.yaml").read_text()))
    assert [m.label for m in written.models] == result.ingredients


def test_the_soup_command_names_a_bad_recipe_in_one_error_line(
    zoo_tiny, tmp_path: Path, monkeypatch, capsys
) -> None:
    from tests.helpers import run_cli

    path = tmp_path / "ties.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "method": "ties",
                "base": str(zoo_tiny.base),
                "models": [{"uri": str(zoo_tiny.experts["zoo_sort"])}],
            }
        )
    )
    code, _, err = run_cli(["soup", str(path)], monkeypatch, capsys)
    assert code == 2
    assert err == "error: method: a soup is a uniform average (linear), not 'ties'\n"
