"""Fixtures for the merge tests: call a registered method through a parsed recipe."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from amalgam.methods.base import MergeContext, get_method
from amalgam.methods.params import layer_index, resolve_params
from amalgam.recipe import parse_recipe

Merge = Callable[..., torch.Tensor]


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run on one intra-op thread: these tensors are tiny, and on a loaded machine torch's
    thread hand-offs cost ~10 ms per op (a 65536-bin bincount: 25 us on one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def merge() -> Merge:
    """``merge(method, base, inputs, params=None, models=None, name="w", ...)`` -> tensor.

    Builds a recipe (``models`` is one params dict per input), validates it, resolves the
    parameters for tensor ``name`` (so defaults and overrides are exercised), calls the
    registered method, and checks that no input was changed in place.
    """

    def run(
        method: str,
        base: torch.Tensor | None,
        inputs: list[torch.Tensor],
        params: dict[str, Any] | None = None,
        models: list[dict[str, Any]] | None = None,
        name: str = "w",
        seed: int = 0,
        num_layers: int = 1,
        overrides: list[dict[str, Any]] | None = None,
        stats: dict[str, Any] | None = None,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        models = models or [{} for _ in inputs]
        assert len(models) == len(inputs), "one params dict per input"
        recipe = parse_recipe(
            {
                "method": method,
                "base": None if base is None else "base",
                "models": [{"uri": f"m{i}", "params": m} for i, m in enumerate(models)],
                "params": params or {},
                "overrides": overrides or [],
                "seed": seed,
            }
        )
        spec = get_method(method)
        p = resolve_params(recipe, spec, name, num_layers)
        ctx = MergeContext(
            name=name, layer=layer_index(name), seed=seed, stats=stats or {}, out_dtype=out_dtype
        )
        before = [x.clone() for x in ([] if base is None else [base]) + inputs]
        out = spec.fn(base, inputs, p, ctx)
        after = ([] if base is None else [base]) + inputs
        for b, a in zip(before, after, strict=True):
            assert torch.equal(a, b), "the method changed an input in place"
        return out

    return run
