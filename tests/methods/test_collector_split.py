"""Whole-model collectors split over workers (fork, update, join) give what one stream gives."""

from __future__ import annotations

import pytest
import torch

from amalgam.methods.pcb import PCBStatistics
from amalgam.methods.whole_model import MagnitudeThreshold


def chunks() -> list[list[torch.Tensor]]:
    """Per tensor, two models' task vectors, of uneven sizes and scales."""
    g = torch.Generator().manual_seed(11)
    sizes = [7, 300, 1, 64, 129, 5000, 33]
    return [[torch.randn(n, generator=g) * (1 + i) for i in range(2)] for n in sizes]


def one_stream(stat, tensors):
    for p in range(stat.passes):
        for deltas in tensors:
            stat.update(p, deltas)
        stat.end_pass(p)
    return stat.result()


def split(stat, tensors, cuts):
    """Each pass: a fork per run of tensors (as Ray tasks), joined in order."""
    runs = [tensors[a:b] for a, b in zip([0, *cuts], [*cuts, len(tensors)], strict=True)]
    for p in range(stat.passes):
        for run in runs:
            fork = stat.fork()
            for deltas in run:
                fork.update(p, deltas)
            stat.join(fork)
        stat.end_pass(p)
    return stat.result()


@pytest.mark.parametrize("cuts", [[1], [2, 5], [1, 2, 3, 4, 5, 6]])
@pytest.mark.parametrize(
    "make", [lambda: MagnitudeThreshold([0.1, 0.5]), lambda: PCBStatistics([0.2, 0.3], 0.01)]
)
def test_a_split_pass_gives_the_same_statistic(make, cuts) -> None:
    tensors = chunks()
    whole = one_stream(make(), tensors)
    assert split(make(), tensors, cuts) == whole
