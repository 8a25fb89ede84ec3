"""AdaMerging on a tiny Llama: the entropy objective, its gradient and one Adam step against
naive computations; the merge against a per-tensor sum; the clamp; determinism; artifact
reuse; a recipe without data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amalgam.engine import learned as learned_pass
from amalgam.errors import RecipeError
from amalgam.methods.adamerging import learn_coefficients
from amalgam.recipe import parse_recipe
from amalgam.statistics.learning import Sampler, entropy, merged, pad, task_loss
from tests.methods.learned_models import (
    Setup,
    build_setup,
    learned_table,
    merge,
    naive_entropy,
    naive_loss,
    naive_state,
    problem,
    recipe,
    states,
)

SETTINGS = {"granularity": "task", "init": 0.3, "lr": 1e-3, "steps": 1, "batch_size": 64}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return build_setup(tmp_path_factory.mktemp("adamerging"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def uniform(setup: Setup, c: list[float]) -> dict[str, list[float]]:
    return {n: c for n in states(setup)[0]}


def test_entropy_equals_naive_sum_over_vocabulary(setup: Setup) -> None:
    prob = problem(setup)
    c = [0.2, 0.7]
    params = merged(prob, torch.tensor([c]))
    batch = pad(prob.tasks[0], prob.pad_id, torch.device("cpu"))  # padded: prompts differ
    assert len(set(map(len, prob.tasks[0]))) > 1
    got = float(entropy(prob.model, params, batch))
    want = naive_entropy(setup, naive_state(setup, uniform(setup, c)), setup.data[0])
    assert got == pytest.approx(want, rel=1e-5)


def test_gradient_and_one_adam_step_match_finite_differences(setup: Setup) -> None:
    prob = problem(setup)
    lam = torch.tensor([[0.3, 0.3]], requires_grad=True)
    sampler = Sampler(prob.tasks, 64, prob.pad_id, seed=0)  # a batch is a task's whole data
    task_loss(prob, sampler, merged(prob, lam.clamp(0.0, 1.0))).backward()
    h = 1e-2
    fd = []
    for k in range(2):
        up, down = [0.3, 0.3], [0.3, 0.3]
        up[k] += h
        down[k] -= h
        plus = naive_loss(setup, naive_state(setup, uniform(setup, up)))
        minus = naive_loss(setup, naive_state(setup, uniform(setup, down)))
        fd.append((plus - minus) / (2 * h))
    grad = lam.grad[0].tolist()
    assert grad == pytest.approx(fd, rel=2e-2, abs=1e-4)
    # Adam's first step moves each coefficient by lr * g / (|g| + eps)
    stepped = learn_coefficients(prob, SETTINGS, seed=0)[0].tolist()
    want = [0.3 - 1e-3 * g / (abs(g) + 1e-8) for g in grad]
    assert stepped == pytest.approx(want, abs=1e-7)


def test_clamp_keeps_coefficients_in_unit_interval(setup: Setup) -> None:
    prob = problem(setup)
    settings = {**SETTINGS, "granularity": "layer", "lr": 0.5, "steps": 4}
    table = learn_coefficients(prob, settings, seed=0)
    assert table.shape == (len(prob.names), 2)
    assert bool(((table >= 0) & (table <= 1)).all())
    assert bool(((table == 0) | (table == 1)).any())  # the large steps hit a bound


def test_merge_equals_per_tensor_sum_of_learned_coefficients(
    setup: Setup, home: Path, tmp_path: Path
) -> None:
    out = merge(setup, "adamerging", {"steps": 3, "lr": 0.05}, tmp_path / "out")
    table, masks = learned_table(home)
    assert not masks
    assert len({c for row in table.values() for c in row}) > 2  # layer-wise: rows differ
    assert all(0.0 <= c <= 1.0 for row in table.values() for c in row)
    got = load_file(out / "model.safetensors")
    want = naive_state(setup, table)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


def sha(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_bytes_and_the_artifact_is_reused(
    setup: Setup, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = {"steps": 3, "lr": 0.05}
    first = sha(merge(setup, "adamerging", params, tmp_path / "a"))
    (artifact,) = (home / "learned").glob("*.safetensors")
    learned_bytes = artifact.read_bytes()
    artifact.unlink()
    assert sha(merge(setup, "adamerging", params, tmp_path / "b")) == first  # learned again
    assert artifact.read_bytes() == learned_bytes

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("learned again")

    monkeypatch.setattr(learned_pass, "_learn", refuse)
    assert sha(merge(setup, "adamerging", params, tmp_path / "c")) == first  # reused
    with pytest.raises(AssertionError, match="learned again"):  # another seed: another key
        merge(setup, "adamerging", params, tmp_path / "d", seed=1)


@pytest.mark.parametrize("method", ["adamerging", "concrete_ta", "concrete_adamerging"])
def test_recipe_without_data_names_the_field(setup: Setup, method: str) -> None:
    models = [{"uri": str(e)} for e in setup.experts]

    with pytest.raises(RecipeError, match=r"models\[0\]\.data: method '" + method):
        parse_recipe({"method": method, "base": str(setup.base), "models": models})
    recipe(setup, method, {})  # valid with data
    with pytest.raises(RecipeError, match=r"models\[0\]\.statistics: .*give data:"):
        parse_recipe(
            {
                "method": method,
                "base": str(setup.base),
                "models": [{"uri": str(e), "statistics": "x.safetensors"} for e in setup.experts],
            }
        )
