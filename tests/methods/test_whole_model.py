"""MagnitudeThreshold (two-pass radix selection) against torch.sort of the concatenated values."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from amalgam.methods.sparsify import trim_magnitude
from amalgam.methods.whole_model import MagnitudeThreshold


def run_passes(chunks: list[list[torch.Tensor]], densities: list[float]) -> list[float]:
    """Feed ``chunks`` (one list of per-model deltas per tensor) through every pass."""
    stat = MagnitudeThreshold(densities)
    for pass_ in range(stat.passes):
        for deltas in chunks:
            stat.update(pass_, deltas)
        stat.end_pass(pass_)
    return stat.result()


def exact_by_sort(parts: list[torch.Tensor], density: float) -> float:
    """k-th largest |value| of the concatenation, k = max(1, floor(density * total))."""
    values = torch.cat([p.reshape(-1).float().abs() for p in parts])
    k = max(1, math.floor(density * values.numel()))
    return torch.sort(values, descending=True).values[k - 1].item()


def models_in_chunks(
    make: Callable[..., torch.Tensor], shapes: list[tuple[int, ...]], n_models: int, seed: int
) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[make(s, g) for _ in range(n_models)] for s in shapes]


SHAPES = [(37,), (8, 16), (3, 5, 7), (1,), (), (200,)]


def gaussian(shape, g):
    return torch.randn(shape, generator=g) * 0.01


def few_values(shape, g):
    # many duplicates, both signs and zeros: magnitudes in {0, .5, 1, 1.5}
    return (torch.randint(-3, 4, shape, generator=g) * 0.5).float()


def wide_range(shape, g):
    # magnitudes over many binades, including subnormals and exact zeros
    exp = torch.randint(-140, 20, shape, generator=g).float()
    v = torch.randn(shape, generator=g) * torch.pow(2.0, exp)
    return torch.where(torch.rand(shape, generator=g) < 0.1, torch.zeros(shape), v)


def same_high_bits(shape, g):
    # every value shares the high 16 bits (one pass-1 bin): pass 2 must do all the work
    return 1.0 + torch.randint(0, 1 << 7, shape, generator=g).float() * 2.0**-23


@pytest.mark.parametrize("make", [gaussian, few_values, wide_range, same_high_bits])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.01, 1e-4])
def test_equals_exact_kth_largest(make, density):
    n_models = 3
    seed = len(make.__name__) * 1000 + int(density * 999)
    chunks = models_in_chunks(make, SHAPES, n_models, seed)
    densities = [density, min(1.0, density * 2), density / 2]
    result = run_passes(chunks, densities)
    for i, d in enumerate(densities):
        expected = exact_by_sort([c[i] for c in chunks], d)
        assert result[i] == expected, (i, d)


def test_chunking_does_not_matter():
    g = torch.Generator().manual_seed(1)
    whole = torch.randn(1000, generator=g)
    one = run_passes([[whole]], [0.1])
    many = run_passes([[p] for p in whole.split([1, 99, 400, 250, 250])], [0.1])
    assert one == many == [exact_by_sort([whole], 0.1)]


def test_by_hand():
    # |values| = [4, 3, 3, 2, 1, 0] over two chunks; density 0.5 -> k = 3 -> 3rd largest = 3;
    # density 1/6 -> k = 1 -> 4; density 1 -> k = 6 -> 0; density 0.01 -> k = max(1, 0) = 1.
    # One density per model; the four models here hold the same values.
    densities = [0.5, 1 / 6, 1.0, 0.01]
    parts = [torch.tensor([-4.0, 3.0]), torch.tensor([3.0, -2.0, 1.0, 0.0])]
    chunks = [[p] * len(densities) for p in parts]
    assert run_passes(chunks, densities) == [3.0, 4.0, 0.0, 4.0]


def test_sign_of_zero_and_negative_values():
    # -0.0 and 0.0 are the same magnitude; negative values count by magnitude.
    values = torch.tensor([-0.0, 0.0, -5.0, 2.0])
    assert run_passes([[values, values]], [0.25, 1.0]) == [5.0, 0.0]


def test_threshold_keeps_the_same_entries_as_a_whole_model_trim():
    # Using the threshold on each tensor keeps exactly what trimming the concatenation keeps.
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(s, generator=g) for s in [(10, 10), (50,), (4, 4, 4)]]
    (threshold,) = run_passes([[p] for p in parts], [0.15])
    trimmed = torch.cat([trim_magnitude(p, 0.15, threshold).reshape(-1) for p in parts])
    whole = trim_magnitude(torch.cat([p.reshape(-1) for p in parts]), 0.15)
    assert torch.equal(trimmed, whole)
    assert int((trimmed != 0).sum()) == math.floor(0.15 * 214)


def test_bf16_deltas_are_measured_in_float32():
    # bf16 inputs are upcast: the threshold is a float32 value of the exact bf16 differences.
    g = torch.Generator().manual_seed(4)
    base = torch.randn(300, generator=g).bfloat16()
    model = (base.float() + 0.01 * torch.randn(300, generator=g)).bfloat16()
    delta = model.float() - base.float()
    (threshold,) = run_passes([[delta.bfloat16()]], [0.2])
    assert threshold == exact_by_sort([delta], 0.2)
