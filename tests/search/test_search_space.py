"""The search space: coordinates of the method's parameters, their map from the unit cube to a
recipe (checked against a naive task arithmetic on small tensors), CMA-ES kept in bounds, and
the bad inputs (unknown parameter, unknown task) named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from amalgam.engine import MergeOptions, run_merge
from amalgam.errors import RecipeError
from amalgam.recipe import parse_recipe
from amalgam.search.evolve import new_state
from amalgam.search.spec import (
    Bound,
    build_space,
    layer_groups,
    load_search_spec,
    parse_search_spec,
    prepare,
)

LAYERS = 4


def tiny_llama(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(6, 3, generator=g)}
    for i in range(LAYERS):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(3, 3, generator=g)
    return tensors


@pytest.fixture
def models(tmp_path: Path, save_checkpoint) -> dict[str, Path]:
    config = {"model_type": "llama", "num_hidden_layers": LAYERS}
    return {
        name: save_checkpoint(tmp_path / name, tiny_llama(seed), config=config)
        for seed, name in enumerate(["base", "a", "b"])
    }


def spec_for(models: dict[str, Path], **fields) -> tuple:
    recipe = parse_recipe(
        {
            "method": "task_arithmetic",
            "base": str(models["base"]),
            "models": [{"uri": str(models["a"])}, {"uri": str(models["b"])}],
            "params": {"lambda": 0.5},
            "dtype": "float32",
        }
    )
    spec = parse_search_spec(
        {
            "recipe": "unused.yaml",
            "space": {"weight": {"low": 0.0, "high": 2.0}, "lambda": {"low": 0.1, "high": 1.1}},
            "objective": {"tasks": {"t": 1.0}},
            **fields,
        },
        "test",
    )
    return spec, recipe


def test_layer_groups_are_contiguous_and_cover_every_layer() -> None:
    assert layer_groups(4, 2) == [(0, 1), (2, 3)]
    groups = layer_groups(7, 3)
    assert [i for g in groups for i in g] == list(range(7))
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    with pytest.raises(RecipeError, match="layer_groups: 5 groups for a model of 4 layers"):
        layer_groups(4, 5)


def test_a_point_maps_to_the_recipe_the_engine_merges_as_naive_task_arithmetic(
    models, tmp_path: Path
) -> None:
    """Two layer groups: every value once for the tensors outside the layers and once per
    group; the merged tensors equal base + lambda * sum_i w_i (W_i - base) computed here with
    the values each tensor's group should get."""
    spec, recipe = spec_for(models, layer_groups=2)
    space = build_space(spec, recipe)
    names = [c.name for c in space.coordinates]
    assert names == [
        "weight[a]",
        "weight[b]",
        "weight[a]@layers0-1",
        "weight[b]@layers0-1",
        "weight[a]@layers2-3",
        "weight[b]@layers2-3",
        "lambda",
        "lambda@layers0-1",
        "lambda@layers2-3",
    ]
    x = [0.1, 0.9, 0.25, 0.5, 0.75, 1.0, 0.0, 0.5, 1.0]
    values = space.values(x)
    assert values["weight[a]"] == pytest.approx(0.2) and values["lambda"] == pytest.approx(0.1)
    assert values["weight[b]@layers2-3"] == pytest.approx(2.0)
    out = tmp_path / "merged"
    candidate = space.recipe_at(x).model_copy(update={"output": str(out)})
    run_merge(candidate, MergeOptions(threads=1))
    from safetensors.torch import load_file

    merged = load_file(str(out / "model.safetensors"))
    base, a, b = (tiny_llama(s) for s in range(3))

    def where(name: str) -> str:
        if ".layers." not in name:
            return ""
        layer = int(name.split(".layers.")[1].split(".")[0])
        return "@layers0-1" if layer < 2 else "@layers2-3"

    for name, w0 in base.items():
        g = where(name)
        lam, wa, wb = values["lambda" + g], values["weight[a]" + g], values["weight[b]" + g]
        expected = w0 + lam * (wa * (a[name] - w0) + wb * (b[name] - w0))
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)


def test_the_start_point_is_the_recipes_own_values_and_cma_stays_in_bounds(models) -> None:
    spec, recipe = spec_for(models, population=6, seed=3)
    space = build_space(spec, recipe)
    # weight 1 (the default) in [0, 2]; lambda 0.5 in [0.1, 1.1]
    assert space.start() == pytest.approx([0.5, 0.5, 0.4])
    from amalgam.search.spec import Prepared

    state = new_state(Prepared(spec, space, Path("."), Path("."), "d"))
    assert state.optimizer.population_size == 6
    for _ in range(5):
        xs = [state.optimizer.ask() for _ in range(6)]
        for x in xs:
            assert all(0.0 <= v <= 1.0 for v in x)
            for c, v in zip(space.coordinates, x, strict=True):
                assert c.low <= space.values(list(x))[c.name] <= c.high
                assert space.values(list(x))[c.name] == pytest.approx(c.low + v * (c.high - c.low))
        state.optimizer.tell([(x, float(sum(x))) for x in xs])


def test_an_unknown_parameter_in_the_space_is_named(models) -> None:
    spec, recipe = spec_for(models)
    spec = spec.model_copy(update={"space": {**spec.space, "densty": spec.space["weight"]}})
    with pytest.raises(
        RecipeError,
        match=r"space\.densty: method 'task_arithmetic' has no "
        r"parameter 'densty' \(its parameters: weight, lambda, normalize\)",
    ):
        build_space(spec, recipe)


def test_a_range_outside_the_parameter_or_a_switch_is_refused(models) -> None:
    spec, recipe = spec_for(models)
    ties = recipe.model_copy(update={"method": "ties"})
    bad = spec.model_copy(update={"space": {"density": Bound(low=0.1, high=1.5)}})
    with pytest.raises(RecipeError, match=r"space\.density\.high"):
        build_space(bad, ties)
    switch = spec.model_copy(update={"space": {"normalize": Bound(low=0.0, high=1.0)}})
    with pytest.raises(RecipeError, match=r"space\.normalize: 'normalize' is not a number"):
        build_space(switch, recipe)


def test_an_unknown_task_in_the_objective_is_named(write_spec) -> None:
    spec = load_search_spec(write_spec(objective={"tasks": {"zoo_mulmod": 1, "zoo_nope": 1}}))
    with pytest.raises(RecipeError, match=r"objective\.tasks: unknown task 'zoo_nope'"):
        prepare(spec)


def test_a_bad_spec_names_its_field(write_spec) -> None:
    with pytest.raises(RecipeError, match=r"space\.weight: .*low \(2\.0\) must be below high"):
        load_search_spec(write_spec(space={"weight": {"low": 2.0, "high": 1.0}}))
    with pytest.raises(RecipeError, match="generatons"):
        load_search_spec(write_spec(generatons=3))


def test_the_cli_names_a_bad_space_or_task_in_one_error_line(
    write_spec, monkeypatch, capsys
) -> None:
    from tests.helpers import run_cli

    bad_space = write_spec(space={"weigth": {"low": 0.0, "high": 1.0}})
    code, _, err = run_cli(["search", str(bad_space)], monkeypatch, capsys)
    assert code == 2
    assert err.startswith("error: space.weigth: method 'task_arithmetic' has no parameter")
    assert len(err.strip().splitlines()) == 1
    bad_task = write_spec(objective={"tasks": {"zoo_nope": 1.0}})
    code, _, err = run_cli(["search", str(bad_task)], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: objective.tasks: unknown task 'zoo_nope'")


@pytest.mark.slow
def test_a_candidate_streamed_to_a_scratch_folder_scores_as_in_memory(
    zoo_tiny, tmp_path: Path
) -> None:
    from amalgam.search.trial import Scoring, score_candidate

    recipe = parse_recipe(
        {
            "method": "task_arithmetic",
            "base": str(zoo_tiny.base),
            "models": [{"uri": str(zoo_tiny.experts[e])} for e in ("zoo_sort", "zoo_count")],
        }
    )
    splits = {"validation": 8, "test": 8}
    tasks = ("zoo_sort", "zoo_count")
    in_memory = score_candidate(recipe, Scoring(zoo_tiny.tasks_dir, tasks, splits))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    on_disk = score_candidate(recipe, Scoring(zoo_tiny.tasks_dir, tasks, splits, str(scratch)))
    assert on_disk.scores == in_memory.scores
    assert set(in_memory.scores) == {"validation", "test"}
    assert not any(scratch.iterdir())  # the candidate is removed once scored
