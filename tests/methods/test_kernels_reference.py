"""The kernels against the documented float32 reference, written here as numpy loops over the
models: every ``add(x, alpha=w)`` of the torch path is one fused multiply-add (rounded once).

ATen computes it that way on AVX2 and AVX-512 CPUs (there the kernels equal the torch path:
test_kernels_identity); on CPUs without AVX2 ATen rounds the product first, so the torch path
there differs from the reference by up to half a unit in the last place of each product.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from amalgam.methods.counter_random import lanes, stream_key

f32 = np.float32


def fma32(a: np.ndarray, b: np.ndarray | float, c: np.ndarray) -> np.ndarray:
    """a * b + c rounded once to float32, exactly: the float64 product of two float32 values is
    exact; the float64 sum's rounding error (TwoSum) breaks the one tie where rounding twice
    could differ (the float64 sum landing on a float32 midpoint)."""
    p = a.astype(np.float64) * np.float64(f32(b)) if np.isscalar(b) else a * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    v = s - c64
    err = (p - v) + (c64 - (s - v))
    r32 = s.astype(np.float32)
    below = r32.astype(np.float64) > s
    lo = np.where(below, np.nextafter(r32, f32(-np.inf)), r32)
    hi = np.where(below, r32, np.nextafter(r32, f32(np.inf)))
    tie = (s == (lo.astype(np.float64) + hi.astype(np.float64)) / 2) & (err != 0)
    return np.where(tie, np.where(err > 0, hi, lo), r32).astype(np.float32)


def test_fma32_rounds_once() -> None:
    # 1 + 2^-24 lies halfway between 1 and its successor; the extra 2^-60 decides
    a, c = np.array([1 + 2**-23], np.float32), np.array([-(2**-60)], np.float32)
    assert fma32(a, f32(1 + 2**-23), c)[0] == f32(1 + 2**-22)  # 1 + 2^-22 + 2^-46 - 2^-60
    half = np.array([2**-24], np.float32)
    assert fma32(half, f32(1.0), np.array([1.0], np.float32))[0] == 1.0  # tie to even
    tilt = fma32(half, f32(1.0 + 2**-23), np.array([1.0], np.float32))[0]
    assert tilt == np.nextafter(f32(1.0), f32(2.0))  # just past the tie


def experts(dtype: torch.dtype, shape=(129, 67)) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    base = torch.randn(shape, generator=g)
    xs = [(base + 0.03 * torch.randn(shape, generator=g)).to(dtype) for _ in range(3)]
    return base.to(dtype), xs


def np32(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy()


W = [0.3, -1.3, 0.9]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_linear_is_the_reference(merge, dtype) -> None:
    _, xs = experts(dtype)
    got = merge("linear", None, xs, models=[{"weight": w} for w in (0.3, 1.3, 0.9)])
    acc = np.zeros(xs[0].shape, np.float32)
    for x, w in zip(xs, (0.3, 1.3, 0.9), strict=True):
        acc = fma32(np32(x), w, acc)
    assert np.array_equal(got.numpy().view(np.int32), (acc / f32(2.5)).view(np.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_task_arithmetic_is_the_reference(merge, dtype) -> None:
    base, xs = experts(dtype)
    got = merge(
        "task_arithmetic", base, xs, params={"lambda": 0.7, "normalize": True},
        models=[{"weight": w} for w in W],
    )  # fmt: skip
    b = np32(base)
    mixed = np.zeros_like(b)
    for x, w in zip(xs, W, strict=True):
        mixed = fma32(np32(x) - b, w, mixed)
    want = fma32(mixed / f32(sum(W)), 0.7, b)
    assert np.array_equal(got.numpy().view(np.int32), want.view(np.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_ties_is_the_reference(merge, dtype) -> None:
    base, xs = experts(dtype)
    density = 0.3
    got = merge(
        "ties", base, xs, params={"lambda": 0.9},
        models=[{"weight": w, "density": density} for w in W],
    )  # fmt: skip
    b = np32(base)
    deltas = []
    for x in xs:
        d = np32(x) - b
        k = max(1, int(density * d.size))
        threshold = np.sort(np.abs(d).ravel())[::-1][k - 1]
        deltas.append(np.where(np.abs(d) >= threshold, d, f32(0)))
    votes = np.zeros_like(b)
    for d, w in zip(deltas, W, strict=True):
        votes = fma32(d, w, votes)
    elected = np.where(votes < 0, f32(-1), f32(1))
    mixed, divisor = np.zeros_like(b), np.zeros_like(b)
    for d, w in zip(deltas, W, strict=True):
        agree = np.sign(f32(w) * d) == elected
        mixed = np.where(agree, mixed + f32(w) * d, mixed)
        divisor = np.where(agree, divisor + f32(w), divisor)
    # a negative weight: divisors of magnitude below 1e-8 become (about) 1, as combine does
    divisor = np.where(np.abs(divisor) < f32(1e-8), divisor + (f32(1) - divisor), divisor)
    want = fma32(mixed / divisor, 0.9, b)
    assert np.array_equal(got.numpy().view(np.int32), want.view(np.int32))


def test_dare_keeps_the_counter_lanes_below_the_cutoff(merge) -> None:
    base = torch.zeros(77, 33)
    x = torch.randn(77, 33, generator=torch.Generator().manual_seed(2))
    got = merge("dare_linear", base, [x], models=[{"density": 0.25}], name="m.w", seed=9)
    cutoff = round(0.25 * 2**31)
    keep = lanes(stream_key(9, "m.w", 0), 0, x.numel()).numpy() < cutoff
    want = np.where(keep, x.numpy().ravel() * f32(2**31 / cutoff), f32(0))
    assert np.array_equal(got.numpy().ravel(), want)


@pytest.mark.parametrize("threads", [1, 2])
def test_dare_l1_norms_are_fixed_order_float64_sums(threads: int) -> None:
    """The l1 rescale's norms: per chunk of NORM_CHUNK entries, eight float64 accumulators
    (entry e into e % 8) summed in entry order, then lane by lane, then chunk by chunk."""
    from amalgam.methods.kernels import blocks
    from amalgam.methods.kernels.merge import drop_norms
    from amalgam.methods.sparsify import RandomDrop

    n = 2 * blocks.NORM_CHUNK + 1237
    g = torch.Generator().manual_seed(5)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    x = (base.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16)
    drop = RandomDrop(0.3, stream_key(4, "t", 1), "l1")
    before_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = drop_norms(x, base, drop)
    finally:
        torch.set_num_threads(before_threads)
    d = np.abs(x.float().numpy() - base.float().numpy()).astype(np.float64)
    keep = lanes(drop.key, 0, n).numpy() < drop.cutoff
    want = [0.0, 0.0]
    for c in range(0, n, blocks.NORM_CHUNK):
        for k, v in enumerate((d, np.where(keep, d, 0.0))):
            part = v[c : c + blocks.NORM_CHUNK]
            # np.cumsum adds in order: its last entry is the sequential sum of one lane
            want[k] += float(sum(np.cumsum(part[a :: blocks.LANES])[-1] for a in range(8)))
    assert got == (want[0], want[1])
    # the torch formulation (another order of float64 sums) agrees to rounding
    rows = torch.sub(x.float(), base.float()).reshape(1, -1)
    drop.fit(rows)
    assert abs(drop.scale - want[0] / want[1]) < 1e-12 * drop.scale


TORCH_WITHOUT_AVX2 = """
import json, sys, torch
from amalgam.methods.base import MergeContext, TensorParams, get_method
import amalgam.methods
base, *xs = [torch.tensor(json.loads(a), dtype=torch.float32) for a in sys.argv[1:]]
acc = base.clone().add_(xs[0], alpha=0.3)  # one multiply-add
p = TensorParams({"lambda": 0.7, "normalize": True}, tuple({"weight": w} for w in %r))
out = get_method("task_arithmetic").fn(base, xs, p, MergeContext("w"))
print(torch.backends.cpu.get_cpu_capability(), json.dumps([acc.tolist(), out.tolist()]))
"""


def test_torch_without_avx2_rounds_twice_and_stays_close(merge) -> None:
    base, xs = experts(torch.float32, shape=(4000,))
    env = os.environ | {"ATEN_CPU_CAPABILITY": "default", "AMALGAM_FUSED_KERNELS": "0"}
    args = [json.dumps(t.tolist()) for t in (base, *xs)]
    done = subprocess.run(
        [sys.executable, "-c", TORCH_WITHOUT_AVX2 % (W,), *args],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    capability, values = done.stdout.split(" ", 1)
    assert capability == "DEFAULT"
    acc, out = (np.array(v, dtype=np.float32) for v in json.loads(values))
    b, x = np32(base), np32(xs[0])
    # there ATen rounds the product, then the sum: the reference's single rounding differs
    assert np.array_equal(acc.view(np.int32), (b + f32(0.3) * x).view(np.int32))
    assert (acc != fma32(x, 0.3, b)).any()
    new = merge(
        "task_arithmetic", base, xs, params={"lambda": 0.7, "normalize": True},
        models=[{"weight": w} for w in W],
    ).numpy()  # fmt: skip
    # the method's few operations: apart by a few roundings of the operands' magnitude
    terms = sum(abs(w) * np.abs(np32(x) - b) for x, w in zip(xs, W, strict=True))
    scale = np.abs(b) + 0.7 * terms / abs(sum(W))
    assert (np.abs(out - new) <= 4 * np.finfo(np.float32).eps * scale).all()
    assert (out != new).any()
