"""A method registered from this file alone runs through the planner and both executors.

Two throwaway methods, one per shape the engine plans without knowing them: a per-tensor
method, and one that needs a whole-model statistic first. Nothing in ``amalgam`` names them.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amalgam.engine import MergeOptions, plan_recipe, run_merge
from amalgam.methods import REGISTRY
from amalgam.methods.base import MergeContext, Method, Param, TensorParams, register, unregister
from amalgam.methods.needs import WholeModelStatistic
from amalgam.recipe import parse_recipe
from tests.helpers import family, recipe_dict

SCALE = Param("scale", 1.0, "multiplier of the summed task vectors", low=0.0)


def scaled_sum(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    """W0 + scale * sum_i (W_i - W0)."""
    b = base.float()
    total = torch.zeros_like(b)
    for x in inputs:
        total.add_(torch.sub(x.float(), b))
    return total.mul_(p.shared["scale"]).add_(b)


class TaskNorms:
    """Each model's whole task-vector L2 norm, in one streaming pass (float64 sums)."""

    key = "task_norms"
    passes = 1

    def __init__(self, models: int):
        self.squares = [0.0] * models

    def update(self, pass_: int, deltas: list[torch.Tensor]) -> None:
        for i, d in enumerate(deltas):
            self.squares[i] += float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2

    def fork(self) -> TaskNorms:
        return TaskNorms(len(self.squares))

    def join(self, part: TaskNorms) -> None:
        self.squares = [a + b for a, b in zip(self.squares, part.squares, strict=True)]

    def end_pass(self, pass_: int) -> None:
        pass

    def result(self) -> list[float]:
        return [s**0.5 for s in self.squares]


def unit_sum(
    base: torch.Tensor, inputs: list[torch.Tensor], p: TensorParams, ctx: MergeContext
) -> torch.Tensor:
    """W0 + scale * sum_i tau_i / ||tau_i||, each norm over the model's whole task vector."""
    b = base.float()
    total = torch.zeros_like(b)
    for x, norm in zip(inputs, ctx.stats[TaskNorms.key], strict=True):
        total.add_(torch.sub(x.float(), b), alpha=1.0 / norm)
    return total.mul_(p.shared["scale"]).add_(b)


def task_norms(p: TensorParams) -> list[TaskNorms]:
    return [TaskNorms(len(p.per_model))]


THROWAWAY = (
    Method("test_scaled_sum", scaled_sum, (SCALE,), "sum of task vectors", "none"),
    Method(
        "test_unit_sum",
        unit_sum,
        (SCALE,),
        "sum of unit-norm task vectors",
        "none",
        needs=(WholeModelStatistic(task_norms),),
    ),
)


@pytest.fixture
def throwaway() -> Iterator[None]:
    for method in THROWAWAY:
        register(method)
    try:
        yield
    finally:
        for method in THROWAWAY:
            unregister(method.name)


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, list[Path]]:
    return family(tmp_path / "in")


def merged(method: str, models: tuple[Path, list[Path]], out: Path, executor: str = "local"):
    base, experts = models
    data = recipe_dict(base, experts, method, out, params={"scale": 0.7}, max_shard_size=600)
    recipe = parse_recipe(data)
    run_merge(recipe, MergeOptions(executor=executor, device="cpu"))
    return recipe


def expected(method: str, models: tuple[Path, list[Path]]) -> dict[str, torch.Tensor]:
    """The merge computed here from the raw files, independently of the engine."""
    base_path, expert_paths = models
    base = load_file(str(base_path / "model.safetensors"))
    experts = [load_file(str(e / "model.safetensors")) for e in expert_paths]
    floats = [n for n, t in base.items() if t.is_floating_point()]
    taus = [{n: e[n].double() - base[n].double() for n in floats} for e in experts]
    if method == "test_unit_sum":
        norms = [torch.cat([t[n].reshape(-1) for n in floats]).norm() for t in taus]
    else:
        norms = [1.0] * len(taus)
    out = {n: t for n, t in base.items() if not t.is_floating_point()}
    for n in floats:
        total = sum(t[n] / norm for t, norm in zip(taus, norms, strict=True))
        out[n] = (base[n].double() + 0.7 * total).to(base[n].dtype)
    return out


def output_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("method", [m.name for m in THROWAWAY])
def test_a_method_registered_in_a_test_file_merges_as_computed_here(
    throwaway, models, tmp_path: Path, method: str
) -> None:
    merged(method, models, tmp_path / "out")
    got, want = output_tensors(tmp_path / "out"), expected(method, models)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        # one bfloat16 rounding apart at most (float32 here, float64 above)
        torch.testing.assert_close(got[name].float(), tensor.float(), rtol=8e-3, atol=1e-6)


def test_the_plan_names_the_passes_the_method_needs(throwaway, models, tmp_path: Path) -> None:
    base, experts = models
    plain = plan_recipe(parse_recipe(recipe_dict(base, experts, "test_scaled_sum", tmp_path / "o")))
    needs = plan_recipe(parse_recipe(recipe_dict(base, experts, "test_unit_sum", tmp_path / "o")))
    assert "whole-model" not in plain.describe()
    assert "1. whole-model statistics: task_norms (1 streaming pass)" in needs.describe()
    assert "2. tensors: merge each tensor" in needs.describe()


def test_the_throwaway_methods_leave_the_registry_with_the_test(throwaway) -> None:
    assert {m.name for m in THROWAWAY} <= set(REGISTRY)


def test_the_registry_holds_no_throwaway_method_outside_the_fixture() -> None:
    assert not {m.name for m in THROWAWAY} & set(REGISTRY)


@pytest.mark.slow
def test_local_and_ray_give_the_same_bytes_for_a_throwaway_method(
    throwaway, models, tmp_path: Path
) -> None:
    # lazy: Ray takes seconds to import; only this test needs it. Ray workers cannot import
    # this test module by name, so its functions travel by value, inside the job context.
    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        for method in THROWAWAY:
            local, ray = tmp_path / f"{method.name}-local", tmp_path / f"{method.name}-ray"
            merged(method.name, models, local)
            merged(method.name, models, ray, executor="ray")
            assert len(digest(local)) > 2, method.name  # several shards: several Ray tasks
            assert digest(local) == digest(ray), method.name
    finally:
        cloudpickle.unregister_pickle_by_value(module)
