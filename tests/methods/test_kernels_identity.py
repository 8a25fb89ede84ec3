"""The fused kernels give the torch path's bytes (AMALGAM_FUSED_KERNELS=0: the unchanged torch
ops) for every method they serve, dtype, odd shape and thread count."""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np
import pytest
import torch

from amalgam.methods.kernels import launch

# 1-D, scalar, rows not a multiple of any block or vector width, and a multi-block tensor
SHAPES = [(), (37,), (3, 5), (129, 67), (700, 1031)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]

CASES: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = [
    ("linear", {}, [{"weight": 0.3}, {"weight": 1.7}, {"weight": 0.1}]),
    ("linear", {"normalize": False}, [{"weight": 0.3}, {"weight": 1.1}, {"weight": 2.0}]),
    ("linear", {}, [{"weight": 0.0}, {"weight": 0.0}, {"weight": 0.0}]),
    ("task_arithmetic", {"lambda": 0.7}, [{"weight": 0.3}, {"weight": -1.3}, {"weight": 0.9}]),
    ("task_arithmetic", {"normalize": True}, [{"weight": 0.3}, {"weight": 0.6}, {}]),
    ("ties", {"lambda": 0.9}, [{"weight": 0.3, "density": 0.4}, {"weight": 1.3}, {}]),
    ("ties", {"consensus": "count"}, [{"weight": -0.7}, {"weight": 0.0}, {"density": 0.9}]),
    ("ties", {"normalize": False}, [{"density": 1.0}, {"weight": 2.5}, {"weight": 0.4}]),
    ("ties", {}, [{"weight": 1.0}, {"weight": -1.0}, {"weight": 1e-9}]),
    ("dare_ties", {"lambda": 1.3}, [{"weight": 0.3}, {"density": 0.5}, {"density": 0.03}]),
    ("dare_ties", {"rescale": "l1", "normalize": True}, [{"weight": 0.8}, {}, {}]),
    ("dare_ties", {"consensus": "count", "rescale": "none"}, [{"density": 1.0}, {}, {}]),
    ("dare_linear", {"lambda": 0.6}, [{"weight": 0.3, "density": 0.7}, {}, {"weight": -2.0}]),
    ("dare_linear", {"normalize": True, "rescale": "l1"}, [{"weight": 0.5}, {}, {}]),
]


def models(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """A base and three fine-tunes in ``dtype``: deltas of a few percent, some entries equal."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    out = [base.to(dtype)]
    for _ in range(3):
        x = base + 0.05 * torch.randn(shape, generator=g)
        x.view(-1)[::7] = base.view(-1)[::7]  # zero task-vector entries
        out.append(x.to(dtype))
    return out


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int32).numpy()


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_torch_path(merge, monkeypatch, case, dtype) -> None:
    method, params, per_model = case
    calls = []
    run_ranges = launch.run_ranges
    monkeypatch.setattr(launch, "run_ranges", lambda k, n: calls.append(n) or run_ranges(k, n))
    for k, shape in enumerate(SHAPES):
        base, *inputs = models(shape, dtype, seed=k)
        run = dict(params=params, models=per_model, name=f"layers.{k}.w", seed=5)
        b = None if method == "linear" else base
        fused = merge(method, b, inputs, **run)
        assert calls[-1] == base.numel()  # the merge kernel ran (after any selection's)
        calls.clear()
        monkeypatch.setenv("AMALGAM_FUSED_KERNELS", "0")
        reference = merge(method, b, inputs, **run)
        assert not calls
        monkeypatch.delenv("AMALGAM_FUSED_KERNELS")
        assert fused.dtype == reference.dtype == torch.float32
        assert fused.shape == reference.shape == shape
        assert np.array_equal(bits(fused), bits(reference)), (method, shape)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_bytes_do_not_depend_on_threads(merge, monkeypatch, threads) -> None:
    monkeypatch.setattr(launch, "MIN_RANGE", 1000)  # cut even this tensor into ranges
    base, *inputs = models((301, 257), torch.bfloat16, seed=3)
    run = dict(params={"lambda": 0.8}, models=[{"weight": 0.4}, {}, {"density": 0.3}])
    torch.set_num_threads(1)
    one = merge("dare_ties", base, inputs, **run)
    torch.set_num_threads(threads)
    many = merge("dare_ties", base, inputs, **run)
    torch.set_num_threads(1)
    assert np.array_equal(bits(one), bits(many))


def test_ineligible_inputs_keep_the_torch_path() -> None:
    x = torch.zeros(4, 4)
    assert launch.eligible([x, x.bfloat16(), x.bfloat16()])
    assert not launch.eligible([x, x.bfloat16(), x.half()])  # models of two dtypes
    assert not launch.eligible([x, x.double()])
    assert not launch.eligible([x, x.t()])  # not contiguous


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_base_of_another_dtype(merge, monkeypatch, method) -> None:
    base, *inputs = models((130, 33), torch.bfloat16, seed=4)
    run = dict(params={"lambda": 0.6}, models=[{"weight": 0.2}, {"weight": 0.9}, {}])
    fused = merge(method, base.float(), inputs, **run)
    monkeypatch.setenv("AMALGAM_FUSED_KERNELS", "0")
    assert np.array_equal(bits(fused), bits(merge(method, base.float(), inputs, **run)))


def test_unloadable_numba_keeps_the_torch_path(merge, monkeypatch, caplog) -> None:
    base, *inputs = models((40, 9), torch.float32, seed=6)
    want = merge("ties", base, inputs, params={"lambda": 0.5})
    monkeypatch.setitem(sys.modules, "amalgam.methods.kernels.blocks", None)  # import fails
    monkeypatch.setattr(launch, "compiled", functools.cache(launch.compiled.__wrapped__))
    got = merge("ties", base, inputs, params={"lambda": 0.5})
    assert launch.compiled() is None
    assert "fused kernels unavailable" in caplog.text
    assert np.array_equal(bits(got), bits(want))
