"""Concrete subspace learning on a tiny Llama: the mask sample against its formula, the mask
gradient against finite differences of the naive objective, both merges against a per-tensor
sum with the learned mask, determinism."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amalgam.engine import MergeOptions, run_merge
from amalgam.methods.concrete import sample_mask
from amalgam.statistics.learning import Sampler, merged, task_loss
from tests.methods.learned_models import (
    Setup,
    build_setup,
    learned_table,
    merge,
    naive_loss,
    naive_state,
    problem,
    recipe,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return build_setup(tmp_path_factory.mktemp("concrete"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def naive_mask(logits: list[float], u: list[float], t: float) -> list[float]:
    m = [
        1 / (1 + math.exp(-(math.log(a) - math.log(1 - a) + x) / t))
        for x, a in zip(logits, u, strict=True)
    ]
    mean = sum(m) / len(m)
    return [v / mean for v in m]


def test_mask_sample_follows_the_relaxed_bernoulli_formula() -> None:
    logits = {"b": torch.tensor([0.5, -1.0, 2.0]), "a": torch.tensor([[0.0, 1.0], [-2.0, 3.0]])}
    got = sample_mask(logits, 0.5, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    for name in ("a", "b"):  # noise drawn in sorted name order
        u = torch.rand(logits[name].shape, generator=g).flatten().tolist()
        want = naive_mask(logits[name].flatten().tolist(), u, 0.5)
        assert got[name].flatten().tolist() == pytest.approx(want, rel=1e-5)


def test_mask_gradient_matches_finite_differences(setup: Setup) -> None:
    prob = problem(setup)
    name = "model.layers.0.mlp.down_proj.weight"
    logits = {n: torch.zeros_like(b, requires_grad=True) for n, b in prob.base.items()}
    masks = sample_mask(logits, 0.5, torch.Generator().manual_seed(3))
    sampler = Sampler(prob.tasks, 64, prob.pad_id, seed=0)
    task_loss(prob, sampler, merged(prob, torch.tensor([[0.3, 0.3]]), masks)).backward()
    lam = {n: [0.3, 0.3] for n in prob.names}
    h = 5e-2
    for index in [(0, 0), (3, 5)]:
        values = []
        for sign in (1, -1):
            shifted = {n: v.detach().clone() for n, v in logits.items()}
            shifted[name][index] += sign * h
            with torch.no_grad():
                m = sample_mask(shifted, 0.5, torch.Generator().manual_seed(3))
            values.append(naive_loss(setup, naive_state(setup, lam, m)))
        fd = (values[0] - values[1]) / (2 * h)
        assert float(logits[name].grad[index]) == pytest.approx(fd, rel=5e-2, abs=2e-5)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("concrete_ta", {"steps": 3, "mask_lr": 0.1}),
        ("concrete_adamerging", {"mask_steps": 2, "steps": 2, "lr": 0.05, "mask_lr": 0.1}),
    ],
)
def test_merge_equals_per_tensor_sum_over_masked_task_vectors(
    setup: Setup, home: Path, tmp_path: Path, method: str, params: dict
) -> None:
    out = merge(setup, method, params, tmp_path / "out")
    table, masks = learned_table(home)
    got = load_file(out / "model.safetensors")
    assert masks.keys() == got.keys()
    for m in masks.values():
        assert float(m.mean()) == pytest.approx(1.0, rel=1e-5)
        assert float(m.std()) > 0.01  # a sample, not all ones
    values = {c for row in table.values() for c in row}
    if method == "concrete_ta":
        assert all(c == pytest.approx(0.3) for c in values)
    else:
        assert len(values) > 2 and all(0.0 <= c <= 1.0 for c in values)
    want = naive_state(setup, table, masks)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


def test_same_seed_same_bytes(setup: Setup, home: Path, tmp_path: Path) -> None:
    params = {"steps": 2, "mask_lr": 0.1}
    digests = []
    for run in ("a", "b"):
        for f in (home / "learned").glob("*.safetensors"):
            f.unlink()  # learn again
        out = merge(setup, "concrete_ta", params, tmp_path / run)
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    other = merge(setup, "concrete_ta", params, tmp_path / "c", seed=5)
    assert hashlib.sha256((other / "model.safetensors").read_bytes()).hexdigest() != digests[0]


@pytest.mark.slow
def test_local_and_ray_outputs_are_byte_identical(setup: Setup, tmp_path: Path) -> None:
    """The mask reaches Ray tasks as the plan's artifact, the coefficients in ``ctx.stats``.
    Runs under the session's $AMALGAM_HOME (Ray keeps its sockets there)."""
    digests = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        r = recipe(setup, "concrete_ta", {"steps": 2}, max_shard_size=4000)
        run_merge(r, MergeOptions(output=str(out), executor=executor, device="cpu", threads=1))
        digests[executor] = {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
        }
    assert sum(n.endswith(".safetensors") for n in digests["local"]) > 2
    assert digests["local"] == digests["ray"]
