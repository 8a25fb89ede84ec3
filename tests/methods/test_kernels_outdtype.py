"""The fused kernels store their results in the output dtype as ``Tensor.to`` rounds: the
narrowing itself on every rounding case, the kernels at each thread count, and whole engine
merges byte-identical to the torch path (``AMALGAM_FUSED_KERNELS=0``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from numba import njit
from safetensors.torch import load_file

from amalgam.engine import MergeOptions, run_merge
from amalgam.methods.kernels import launch
from amalgam.methods.kernels import merge as fused
from amalgam.methods.kernels.scalar import store
from amalgam.recipe import parse_recipe
from tests.helpers import recipe_dict, write_model
from tests.methods.test_kernels_identity import CASES, SHAPES, models

NARROW = {torch.bfloat16: np.uint16, torch.float16: np.int16}
# ATen's AVX2/AVX-512 conversions (what ``store`` follows) set NaN bits; its scalar one differs
VECTOR_ATEN = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@njit(cache=False)
def narrow(x, out):
    for j in range(len(x)):
        store(out, j, x[j])


def offsets(bits: np.ndarray, deltas: tuple[int, ...]) -> np.ndarray:
    """``bits`` plus each of ``deltas``, in both signs (uint32, wrapping)."""
    b = bits.astype(np.int64)
    near = np.concatenate([b + d for d in deltas]) & 0x7FFFFFFF
    return np.concatenate([near, near | 0x80000000]).astype(np.uint32)


def crafted_bits() -> np.ndarray:
    """float32 bit patterns at every rounding edge of bfloat16 and float16: each 16-bit value's
    float32 and the halfway points to its neighbour, one bit either side; zeros, subnormals of
    all three formats, max finite, overflow, infinities, NaNs of several payloads."""
    h = np.arange(1 << 16, dtype=np.int64)
    bf16 = offsets(h << 16, (0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF))
    finite = np.arange(0x7C00, dtype=np.uint16)  # +0 .. 65504
    v = finite.view(np.float16).astype(np.float64)
    nxt = np.append(v[1:], 65536.0)  # past the max finite: where infinity starts
    mid = ((v + nxt) / 2).astype(np.float32)  # exact: a few significant bits
    f16 = offsets(np.concatenate([v.astype(np.float32), mid]).view(np.uint32), (-1, 0, 1))
    special = np.array(
        [0x7F7FFFFF, 0x7F800000, 0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0x7FA01234, 0x00000001],
        dtype=np.int64,
    )
    rng = np.random.default_rng(0)
    random = rng.integers(0, 1 << 32, 1 << 18, dtype=np.int64).astype(np.uint32)
    return np.concatenate([bf16, f16, offsets(special, (0,)), random])


@pytest.mark.parametrize("dtype", list(NARROW), ids=str)
def test_store_rounds_as_tensor_to(dtype) -> None:
    bits = crafted_bits()
    x = bits.view(np.float32)
    out = np.empty(x.size, NARROW[dtype])
    narrow(x, out)
    want = torch.from_numpy(x.copy()).to(dtype).view(torch.int16).numpy().view(out.dtype)
    checked = np.ones(x.size, bool) if VECTOR_ATEN else ~np.isnan(x)
    wrong = np.nonzero((out != want) & checked)[0]
    assert wrong.size == 0, [(hex(bits[i]), hex(out[i] & 0xFFFF)) for i in wrong[:5]]
    assert checked.sum() > 1_000_000 and np.isnan(x).sum() > 1000


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(-1).view(torch.int8).numpy()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_methods_store_the_output_dtype(merge, monkeypatch, dtype, threads) -> None:
    monkeypatch.setattr(launch, "MIN_RANGE", 1000)  # cut even small tensors into ranges
    torch.set_num_threads(threads)  # (the merge fixture restores it)
    for k, (method, params, per_model) in enumerate(CASES):
        shape = SHAPES[k % len(SHAPES)] if k < len(CASES) - 2 else SHAPES[-1]
        base, *inputs = models(shape, dtype, seed=k)
        run = dict(params=params, models=per_model, name=f"layers.{k}.w", seed=5)
        b = None if method == "linear" else base
        wide = merge(method, b, inputs, **run)
        assert wide.dtype == torch.float32
        for out_dtype in NARROW:
            narrowed = merge(method, b, inputs, **run, out_dtype=out_dtype)
            assert narrowed.dtype == out_dtype and narrowed.shape == shape
            assert np.array_equal(bits(narrowed), bits(wide.to(out_dtype))), (method, shape)


@pytest.mark.parametrize("out_dtype", list(NARROW), ids=str)
def test_edge_values_through_the_kernels(out_dtype) -> None:
    """float32 inputs at every rounding edge (and sums past the float32 range) narrowed by
    ``linear`` and ``task_vector_merge`` as the float32 result's ``.to`` rounds them."""
    x = torch.from_numpy(crafted_bits().view(np.float32).copy())
    x = x[torch.isfinite(x)]  # the engine refuses non-finite inputs
    y = torch.flip(x, [0])
    for weights, total in (([1.0], None), ([1.0, 1.0], None), ([0.5, 0.75], 1.25)):
        ins = [x, y][: len(weights)]
        wide = fused.linear(ins, weights, total)
        narrowed = fused.linear(ins, weights, total, out_dtype)
        assert narrowed is not None and narrowed.dtype == out_dtype
        assert np.array_equal(bits(narrowed), bits(wide.to(out_dtype)))
    other = fused.linear([x], [1.0], None, torch.float64)  # not a kernel dtype: float32
    assert other is not None and other.dtype == torch.float32
    zero = torch.zeros_like(x)
    for base, lam in ((zero, 1.0), (y, 0.5), (x, 3.0)):
        args = (base, [x, y], None, [1.0, 0.7], lam, False, None)
        wide = fused.task_vector_merge(*args)
        narrowed = fused.task_vector_merge(*args, dtype=out_dtype)
        assert narrowed is not None and narrowed.dtype == out_dtype
        assert np.array_equal(bits(narrowed), bits(wide.to(out_dtype)))


ENGINE_SHAPES = {  # two row blocks (the second partial), 1-D, a scalar, a tiny 1-D
    "model.embed_tokens.weight": (1100, 300),
    "model.layers.0.input_layernorm.weight": (1031,),
    "model.layers.0.mlp.gate_scale": (),
    "model.norm.weight": (8,),
}
ENGINE_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs")


def engine_models(root: Path, dtype: torch.dtype) -> list[Path]:
    """A base and three experts = base + small random deltas, in ``dtype``."""
    g = torch.Generator().manual_seed(7)
    base = {k: torch.randn(s, generator=g) for k, s in ENGINE_SHAPES.items()}
    folders = [write_model(root / "base", {k: v.to(dtype) for k, v in base.items()})]
    for i in range(3):
        expert = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        folders.append(
            write_model(root / f"expert{i}", {k: v.to(dtype) for k, v in expert.items()})
        )
    return folders


def engine_merge(folders: list[Path], method: str, out: Path, out_dtype: str | None) -> dict:
    """The merged tensors' (dtype, bytes) by name."""
    data = recipe_dict(None if method == "linear" else folders[0], folders[1:], method, out)
    weights = (0.3, 1.1, 0.6) if method == "linear" else (0.3, -0.8, 1.2)
    data["models"] = [
        {**m, "params": {"weight": w}} for m, w in zip(data["models"], weights, strict=True)
    ]
    run_merge(parse_recipe({**data, "seed": 3, "dtype": out_dtype}), MergeOptions(device="cpu"))
    tensors = load_file(str(out / "model.safetensors"))
    return {k: (v.dtype, bits(v).tobytes()) for k, v in tensors.items()}


@pytest.mark.parametrize(
    "dtype,out_dtype",
    [(torch.bfloat16, None), (torch.float16, None), (torch.float32, None),
     (torch.bfloat16, "float16"), (torch.float32, "bfloat16")],
    ids=["bf16", "fp16", "fp32", "bf16-to-fp16", "fp32-to-bf16"],
)  # fmt: skip
def test_engine_merges_keep_their_bytes(tmp_path, monkeypatch, dtype, out_dtype) -> None:
    stored: list[torch.dtype] = []
    output = fused.output
    monkeypatch.setattr(fused, "output", lambda s, d: stored.append(d) or output(s, d))
    planned = {None: dtype, "float16": torch.float16, "bfloat16": torch.bfloat16}[out_dtype]
    folders = engine_models(tmp_path / "models", dtype)
    for method in ENGINE_METHODS:
        stored.clear()
        fast = engine_merge(folders, method, tmp_path / method / "fused", out_dtype)
        if method != "breadcrumbs":  # its band sparsifier keeps the torch path
            assert stored and set(stored) == {planned}, method  # the kernels stored it
        monkeypatch.setenv("AMALGAM_FUSED_KERNELS", "0")
        reference = engine_merge(folders, method, tmp_path / method / "torch", out_dtype)
        monkeypatch.delenv("AMALGAM_FUSED_KERNELS")
        assert fast.keys() == reference.keys() == ENGINE_SHAPES.keys()
        assert {d for d, _ in fast.values()} == {planned}
        for name, (_, data) in fast.items():
            assert data == reference[name][1], (method, name)
