"""Streaming exact order statistics of signed float32 values, against a full sort."""

from __future__ import annotations

import pytest
import torch

from amalgam.methods.whole_model import OrderStatistics, from_orderable, orderable


def test_orderable_keys_sort_like_the_floats():
    x = torch.tensor([-3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, -2.0, 7.25, float("-inf"), 1e30])
    keys = orderable(x)
    assert torch.equal(x[keys.argsort(stable=True)], x.sort(stable=True).values)
    assert [from_orderable(int(k)) for k in keys] == x.tolist()


@pytest.mark.parametrize("ranks", [[0], [4999], [0, 1, 2, 9998, 9999], [1234, 1234, 77]])
def test_ranks_match_a_full_sort(ranks):
    g = torch.Generator().manual_seed(len(ranks))
    # many ties (integer multiples) and both signs; streamed in uneven pieces
    x = torch.randn(10000, generator=g) * torch.randint(-3, 4, (10000,), generator=g).float()
    stats = OrderStatistics()
    for piece in x.split(777):
        stats.add_high(piece)
    assert stats.count == 10000 and stats.maximum == float(x.max())
    stats.choose(ranks)
    for piece in x.split(777):
        stats.add_low(piece)
    ordered = x.sort().values
    assert stats.values() == [float(ordered[r]) for r in ranks]
