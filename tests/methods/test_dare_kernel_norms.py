"""DARE's kernel pieces against references computed here: the hashed lanes against the torch
counter stream, the keep decision against torch's int32 arithmetic, the vector accumulators
against scalar float64 loops, and the l1 norms against the documented order of sums (per chunk
of NORM_CHUNK entries, lane a adds entries e = a mod 8 in increasing e, lanes added 0..7,
chunks added in order) on odd sizes, every dtype, one and two threads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numba import njit

from amalgam.methods.counter_random import lanes, stream_key
from amalgam.methods.kernels import blocks, launch
from amalgam.methods.kernels.counter import draw, kept
from amalgam.methods.kernels.merge import drop_norms
from amalgam.methods.kernels.scalar import add_widened
from amalgam.methods.sparsify import RandomDrop

KEY = stream_key(11, "layers.0.w", 2)


@njit
def drawn_lanes(key, start, n):
    words = np.empty(n // 2 + 1, np.uint64)
    return draw(key, start, n, words) & np.uint32(0x7FFFFFFF)


@njit
def keep_flags(halves, cutoff):
    out = np.empty(len(halves), np.bool_)
    for j in range(len(halves)):
        out[j] = kept(halves[j], cutoff)
    return out


@njit
def widened(acc, rows, groups):
    add_widened(acc, rows, groups)


@pytest.mark.parametrize("start", [0, 1, 2, 1023, 4097])
@pytest.mark.parametrize("n", [1, 2, 7, 1024, 1031])
def test_drawn_lanes_are_the_counter_streams(start: int, n: int) -> None:
    got = drawn_lanes(np.uint64(KEY), start, n)
    assert np.array_equal(got.astype(np.int64), lanes(KEY, start, start + n).numpy())


@pytest.mark.parametrize("cutoff", [1, 2**30 + 3, 2**31 - 1, 2**31])
def test_keep_is_torchs_int32_cutoff_minus_lane_above_zero(cutoff: int) -> None:
    halves = np.array([0, 1, 2**30 + 2, 2**30 + 3, 2**31 - 1, 2**31, 2**32 - 1], np.uint32)
    got = keep_flags(halves, np.int64(cutoff))
    # sparsify.RandomDrop's torch ops: int32 (cutoff - lane), positive (2^31 wraps negative)
    lane = torch.from_numpy((halves & 0x7FFFFFFF).astype(np.int64)).to(torch.int32)
    want = lane.neg().add(torch.tensor(cutoff).to(torch.int32)).sign().clamp(min=0).bool()
    assert np.array_equal(got, want.numpy())
    assert not got[0] if cutoff == 2**31 else got[0]  # 2^31 - 0 wraps: never kept


def test_vector_accumulators_add_each_lane_in_order() -> None:
    g = np.random.default_rng(1)
    # values over 60 binary orders of magnitude: the float64 sums round, so order shows
    rows = (g.standard_normal(8 * 37) * 2.0 ** g.integers(-30, 30, 8 * 37)).astype(np.float32)
    rows[[5, 77]] = [np.inf, np.nan]
    acc = g.standard_normal(8)
    want = acc.copy()
    for e in range(8 * 37):
        want[e % 8] += float(rows[e])
    widened(acc, rows, 37)
    assert [math.isnan(v) for v in acc] == [math.isnan(v) for v in want]
    assert np.array_equal(acc[~np.isnan(acc)], want[~np.isnan(want)])


def documented_norms(x: torch.Tensor, base: torch.Tensor, drop: RandomDrop) -> list[float]:
    """The l1 norms before and after the drop, summed by plain Python loops in the documented
    order; the keep decisions from the torch counter stream."""
    d = np.abs(x.float().numpy().ravel() - base.float().numpy().ravel()).astype(np.float64)
    keep = lanes(drop.key, 0, d.size).numpy() < drop.cutoff
    totals = [0.0, 0.0]
    for c in range(0, d.size, blocks.NORM_CHUNK):
        for k, v in enumerate((d, np.where(keep, d, 0.0))):
            part = v[c : c + blocks.NORM_CHUNK].tolist()
            acc = [0.0] * 8
            for e, value in enumerate(part):
                acc[e % 8] += value
            chunk = 0.0
            for a in range(8):
                chunk += acc[a]
            totals[k] += chunk
    return totals


# odd sizes: not multiples of 8, of BLOCK or of NORM_CHUNK; one spans three chunks
SIZES = [(1,), (13,), (3, 343), (2 * blocks.NORM_CHUNK + 9 * blocks.BLOCK + 5,)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_l1_norms_follow_the_documented_order(monkeypatch, threads: int, dtype) -> None:
    monkeypatch.setattr(launch, "MIN_RANGE", 1000)  # two threads even on small tensors
    torch.set_num_threads(threads)
    try:
        for k, shape in enumerate(SIZES):
            g = torch.Generator().manual_seed(k)
            base = torch.randn(shape, generator=g)
            # deltas over many binary orders, so the float64 sums round (float16's range
            # is too narrow for that: its sums are exact in any order)
            low, high = (-24, 12) if dtype == torch.float16 else (-40, 40)
            scale = 2.0 ** torch.randint(low, high, shape, generator=g)
            x = base + torch.randn(shape, generator=g) * scale
            base, x = base.to(dtype), x.to(dtype)
            drop = RandomDrop(0.3, stream_key(3, f"t.{k}", 1), "l1")
            assert list(drop_norms(x, base, drop)) == documented_norms(x, base, drop), shape
            # a float32 base under models of another dtype
            assert list(drop_norms(x, base.float(), drop)) == documented_norms(
                x, base.float(), drop
            )
    finally:
        torch.set_num_threads(1)


def test_l1_norms_carry_nan_and_infinity_where_the_reference_does() -> None:
    base = torch.zeros(3000)
    x = torch.linspace(-1.0, 1.0, 3000)
    x[100], x[2001] = float("inf"), float("nan")
    drop = RandomDrop(0.5, KEY, "l1")
    got, want = drop_norms(x, base, drop), documented_norms(x, base, drop)
    assert math.isnan(got[0])  # the NaN entry is in the norm before the drop
    assert np.array_equal(np.array(got), np.array(want), equal_nan=True)
