"""PLeaS: the least-squares math against independent solves, the partial matching on a zoo model
and its permuted copy, and ``align.method: pleas`` through the real pipeline (align -> merge)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amalgam.align import run_align
from amalgam.align.permutation.activation_matching import read_texts
from amalgam.align.permutation.aligner import align_activation_matching
from amalgam.align.permutation.pleas import pleas_layer, pleas_merge, token_batches, wider_model
from amalgam.device import load_causal_lm
from amalgam.engine import MergeOptions
from amalgam.errors import PlanError, RecipeError
from amalgam.evaluate.perplexity import sequence_nll, task_texts, token_ids
from amalgam.pipeline import run_pipeline
from amalgam.recipe import AlignSpec, parse_recipe
from amalgam.zoo import Zoo, build_zoo
from tests.zoo.conftest import zoo_home

TASKS = ["zoo_caesar", "zoo_sort", "zoo_count"]


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return build_zoo(zoo_home(), profile="tiny", log=lambda _: None)


def _lam(x: torch.Tensor, ridge: float) -> float:
    return ridge * float((x.double().T @ x.double()).diagonal().mean())


def test_layer_fit_equals_stacked_lstsq():
    """sum_i ||X W^T - Y_i||^2 + 2 lambda ||W||^2 (two models) solved by lstsq on stacked rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    ys = [torch.randn(200, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    ridge = 0.05
    lam = _lam(x, ridge)
    rows = torch.cat([x, x, (2 * lam) ** 0.5 * torch.eye(6, dtype=torch.float64)])
    targets = torch.cat([ys[0], ys[1], torch.zeros(6, 4, dtype=torch.float64)])
    expected = torch.linalg.lstsq(rows, targets).solution.T
    assert torch.allclose(pleas_layer(x, ys, ridge), expected, atol=1e-10)


def test_unit_owned_by_one_model_fits_that_model_alone():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 5, generator=g, dtype=torch.float64)
    ys = [torch.randn(100, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    owners = [torch.tensor([True, True, False]), torch.tensor([True, False, True])]
    got = pleas_layer(x, ys, 0.01, owners)
    lam = _lam(x, 0.01)
    rows = torch.cat([x, lam**0.5 * torch.eye(5, dtype=torch.float64)])

    def alone(y: torch.Tensor) -> torch.Tensor:
        return torch.linalg.lstsq(
            rows, torch.cat([y, torch.zeros(5, dtype=torch.float64)])
        ).solution

    assert torch.allclose(got[1], alone(ys[0][:, 1]), atol=1e-10)  # only the first owns unit 1
    assert torch.allclose(got[2], alone(ys[1][:, 2]), atol=1e-10)  # only the second owns unit 2
    assert torch.allclose(got[0], alone((ys[0][:, 0] + ys[1][:, 0]) / 2), atol=1e-10)


def test_exact_features_give_the_mean_of_the_weights():
    """Hand-worked: with Y_i = X W_i^T and no ridge, the fit is (W_1 + W_2) / 2."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    w1 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    w2 = torch.tensor([[0.0, 4.0]], dtype=torch.float64)
    got = pleas_layer(x, [x @ w1.T, x @ w2.T], 0.0)
    assert torch.allclose(got, torch.tensor([[1.0, 2.0]], dtype=torch.float64))


def _permuted(model: torch.nn.Module, seed: int) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """A copy of ``model`` with each layer's MLP units shuffled (the same function)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    perms = []
    for layer in range(model.config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp."
        perm = torch.randperm(
            model.config.intermediate_size, generator=torch.Generator().manual_seed(seed + layer)
        )
        state[p + "gate_proj.weight"] = state[p + "gate_proj.weight"][perm]
        state[p + "up_proj.weight"] = state[p + "up_proj.weight"][perm]
        state[p + "down_proj.weight"] = state[p + "down_proj.weight"][:, perm]
        perms.append(perm)
    return wider_model(model, state, 0), perms


@pytest.mark.parametrize("budget", [0.0, 0.25])
def test_model_and_its_permuted_copy_merge_back_to_the_model(zoo: Zoo, budget: float):
    model, tokenizer = load_causal_lm(zoo.base, "cpu")
    permuted, perms = _permuted(model, seed=3)
    texts = read_texts(str(zoo.tasks_dir), 128)
    merged, widened, matching = pleas_merge(
        model, permuted, token_batches(tokenizer, texts), budget=budget
    )
    size = model.config.intermediate_size
    for perm, found, corr in zip(perms, matching.perm, matching.correlation, strict=True):
        assert torch.equal(perm[found], torch.arange(size))  # B's unit found[j] is A's unit j
        assert float(corr.min()) > 0.999
    assert matching.extra == round(budget * size)
    assert merged["model.layers.0.mlp.up_proj.weight"].shape[0] == size + matching.extra
    # the merged model computes what the model computes (answer-token NLL on held-out tests)
    seqs = token_ids(tokenizer, task_texts(zoo.tasks_dir, TASKS, "test", 16))
    own, count = sequence_nll(model, seqs)
    fused, _ = sequence_nll(wider_model(model, merged, matching.extra), seqs)
    assert fused / count == pytest.approx(own / count, rel=2e-3)
    # each widened input computes its model's function in the wider layout
    wide_b, _ = sequence_nll(wider_model(model, widened[1], matching.extra), seqs)
    assert wide_b == pytest.approx(own, rel=1e-5)


def _recipe(zoo: Zoo, out: Path, **changes) -> dict:
    data = {
        "method": "linear",
        "models": [{"uri": str(zoo.experts["zoo_caesar"])}, {"uri": str(zoo.experts["zoo_sort"])}],
        "output": str(out),
        "align": {
            "method": "pleas",
            "permutation": {"data": str(zoo.tasks_dir), "samples": 16},
            "pleas": {"budget": 0.25},
        },
    }
    return {**data, **changes}


def test_pipeline_merges_the_aligned_copies_into_the_pleas_solution(
    zoo: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    recipe = parse_recipe(_recipe(zoo, tmp_path / "merged"))
    result = run_pipeline(recipe, MergeOptions(device="cpu"))
    merged = load_file(str(Path(result.output) / "model.safetensors"))
    config = json.loads((Path(result.output) / "config.json").read_text())
    assert config["intermediate_size"] == 160 + 40

    # independently: PLeaS, in memory, on what activation matching hands on (saved, reused)
    workdir = next((tmp_path / "home" / "cache" / "aligned").iterdir())
    inputs = {m.label: m.uri for m in recipe.models}
    matched = align_activation_matching(recipe.align, inputs, str(workdir / "matched"))
    a, tokenizer = load_causal_lm(matched[recipe.models[0].label], "cpu")
    b, _ = load_causal_lm(matched[recipe.models[1].label], "cpu")
    batches = token_batches(tokenizer, read_texts(str(zoo.tasks_dir), 16))
    expected, _, matching = pleas_merge(a, b, batches, budget=0.25)
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(merged[name], tensor, atol=1e-5), name

    # the permutations are an artifact of the align stage's key, reused by a re-run
    copies = sorted(workdir.glob("*/pleas.json"))
    assert len(copies) == 2
    record = json.loads(copies[0].read_text())
    assert record["extra_units"] == 40 and record["layers"][0]["perm"] == matching.perm[0].tolist()
    stamps = [p.stat().st_mtime_ns for p in copies]
    assert run_align(recipe.align, inputs, workdir=str(workdir)) == {
        label: str(workdir / label) for label in inputs
    }
    assert [p.stat().st_mtime_ns for p in copies] == stamps


@pytest.mark.parametrize(
    ("changes", "weights", "message"),
    [
        (
            {"method": "task_arithmetic"},
            (1.0, 1.0),
            "method: align.method pleas needs method: linear",
        ),
        ({}, (1.0, 3.0), r"models\[\*\]\.params\.weight: align\.method pleas needs equal weights"),
        ({"params": {"normalize": False}}, (1.0, 1.0), r"params\.normalize"),
    ],
)
def test_recipe_must_be_the_plain_average(
    zoo: Zoo, tmp_path: Path, changes: dict, weights: tuple[float, float], message: str
):
    data = _recipe(zoo, tmp_path / "out", **changes)
    for model, weight in zip(data["models"], weights, strict=True):
        model["params"] = {"weight": weight}
    if data["method"] == "task_arithmetic":
        data["base"] = str(zoo.base)
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_missing_data_is_refused_naming_the_field(zoo: Zoo, tmp_path: Path):
    inputs = {"a": str(zoo.base), "b": str(zoo.experts["zoo_sort"])}
    with pytest.raises(PlanError, match=r"align\.permutation\.data: activation matching needs"):
        run_align(AlignSpec(method="pleas"), inputs, workdir=str(tmp_path))
    spec = AlignSpec(method="pleas", permutation={"data": str(tmp_path / "nothing")})
    with pytest.raises(PlanError, match=r"nothing does not exist"):
        run_align(spec, inputs, workdir=str(tmp_path))
    assert not list(tmp_path.iterdir())
