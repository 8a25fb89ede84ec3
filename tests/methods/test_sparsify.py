"""Sparsifiers (magnitude trim, random drop, outlier band) against full sorts and hand cases."""

from __future__ import annotations

import math

import pytest
import torch

from amalgam.methods.sparsify import (
    band_mask,
    drop_random,
    keep_count,
    kth_largest,
    outlier_band,
    trim_magnitude,
)

from .naive import as_tensor, band, flat, kth_largest_by_sort, trim


@pytest.mark.parametrize(
    ("numel", "density", "expected"),
    [
        (10, 0.3, 3),  # floor(3.0)
        (10, 0.35, 3),  # floor(3.5)
        (10, 1.0, 10),
        (3, 0.2, 1),  # floor(0.6) = 0 -> at least one
        (1, 0.01, 1),
        (0, 0.5, 0),  # empty tensor keeps nothing
        (1000, 0.006, 6),
    ],
)
def test_keep_count_by_hand(numel, density, expected):
    assert keep_count(numel, density) == expected


def test_keep_count_is_floor_with_a_floor_of_one():
    for n in range(0, 60):
        for density in (0.01, 0.1, 0.2, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0):
            naive = 0 if n == 0 else max(1, math.floor(density * n))
            assert keep_count(n, density) == naive, (n, density)


def test_kth_largest_matches_full_sort():
    g = torch.Generator().manual_seed(0)
    for values in (
        torch.randn(37, generator=g).abs(),
        torch.randint(0, 4, (5, 8), generator=g).float(),  # many duplicates
        torch.rand(50, generator=g) * torch.pow(2.0, torch.randint(-130, 30, (50,), generator=g)),
        torch.zeros(6),
        torch.tensor(2.5),
        torch.tensor([0.0, 0.0, 1.0]),
    ):
        v = flat(values)
        for k in range(1, len(v) + 1):
            assert float(kth_largest(values, k)) == kth_largest_by_sort(v, k)


def test_trim_by_hand_with_kept_ties():
    # |delta| = [1, 3, 3, 2, 3, 0]; density 0.34 of 6 -> floor(2.04) = 2; the 2nd largest is 3
    # and three entries tie at 3, so all three are kept (3 of 6 survive, not 2).
    delta = torch.tensor([1.0, -3.0, 3.0, 2.0, -3.0, 0.0])
    out = trim_magnitude(delta, 0.34)
    assert torch.equal(out, torch.tensor([0.0, -3.0, 3.0, 0.0, -3.0, 0.0]))


@pytest.mark.parametrize("density", [0.01, 0.1, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(), (1,), (5,), (13, 3), (2, 4, 6)])
def test_trim_matches_full_sort(shape, density):
    g = torch.Generator().manual_seed(len(shape) * 100 + int(density * 100))
    for delta in (
        torch.randn(shape, generator=g),
        torch.randint(-3, 4, shape, generator=g).float(),  # ties and zeros
    ):
        out = trim_magnitude(delta, density)
        assert out.shape == delta.shape
        assert torch.equal(out.double(), as_tensor(trim(flat(delta), density), delta))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_trim_other_float_dtypes_keep_the_top_k(dtype):
    # |.| = [0.1, 0.05, 0.3]: density 0.67 keeps floor(2.01) = 2 -> 0.3 and 0.1, whatever the
    # dtype. (A threshold rounded to float32 would lose float64's 0.1: float32(0.1) > 0.1.)
    delta = torch.tensor([0.1, 0.05, -0.3], dtype=dtype)
    out = trim_magnitude(delta, 0.67)
    assert out.dtype == dtype
    assert torch.equal(out, torch.tensor([0.1, 0.0, -0.3], dtype=dtype))
    g = torch.Generator().manual_seed(5)
    for density in (0.1, 0.5):
        delta = torch.randn(40, generator=g, dtype=torch.float64).to(dtype)
        expected = as_tensor(trim(flat(delta), density), delta).to(dtype)
        assert torch.equal(trim_magnitude(delta, density), expected)


def test_trim_density_one_is_identity_and_tiny_keeps_one():
    delta = torch.tensor([0.5, -0.25, 0.125])
    assert torch.equal(trim_magnitude(delta, 1.0), delta)
    assert torch.equal(trim_magnitude(delta, 0.1), torch.tensor([0.5, 0.0, 0.0]))


def test_trim_all_zero_and_empty():
    assert torch.equal(trim_magnitude(torch.zeros(4, 4), 0.2), torch.zeros(4, 4))
    assert trim_magnitude(torch.zeros(0), 0.2).numel() == 0


def test_trim_with_external_threshold_keeps_entries_at_or_above_it():
    # threshold 2: |.| >= 2 kept, equality included; density is ignored.
    delta = torch.tensor([2.0, -1.9, -2.0, 5.0, 0.0])
    out = trim_magnitude(delta, 0.01, threshold=2.0)
    assert torch.equal(out, torch.tensor([2.0, 0.0, -2.0, 5.0, 0.0]))
    # a zero threshold keeps everything
    assert torch.equal(trim_magnitude(delta, 0.01, threshold=0.0), delta)


def kept_mask(out: torch.Tensor) -> torch.Tensor:
    return out != 0


def test_drop_random_rescale_rules_by_hand():
    # delta = [1, 2, 3, 4] (no zeros, so kept entries are exactly the nonzero outputs).
    delta = torch.tensor([1.0, 2.0, 3.0, 4.0] * 8)
    density = 0.5
    outs = {rule: drop_random(delta, density, 7, rule) for rule in ("exact", "l1", "none")}
    mask = kept_mask(outs["none"])
    assert 0 < int(mask.sum()) < delta.numel()
    # The mask depends on the stream key only, not on the rescale rule.
    for out in outs.values():
        assert torch.equal(kept_mask(out), mask)
    # none: survivors unchanged; exact: survivors / 0.5 = x 2
    assert torch.equal(outs["none"], delta * mask)
    assert torch.equal(outs["exact"], delta * mask * 2)
    # l1: survivors x (sum |delta|) / (sum |kept delta|), computed by a loop
    total = sum(abs(v) for v in flat(delta))
    kept = sum(abs(v) for v, m in zip(flat(delta), mask.tolist(), strict=True) if m)
    torch.testing.assert_close(outs["l1"], delta * mask * (total / kept))
    assert math.isclose(float(outs["l1"].abs().sum()), total, rel_tol=1e-6)


def test_drop_random_density_one_is_identity():
    delta = torch.randn(50, generator=torch.Generator().manual_seed(1))
    for rule in ("exact", "l1", "none"):
        assert torch.equal(drop_random(delta, 1.0, 0, rule), delta)


def test_drop_random_l1_is_skipped_for_tiny_norms():
    # sum |delta| = 4e-9 < 1e-7: the L1 rescale is skipped, survivors keep their values.
    delta = torch.full((4,), 1e-9)
    out = drop_random(delta, 0.5, 3, "l1")
    assert torch.equal(out, delta * kept_mask(out))


def test_drop_random_all_zero_delta_stays_zero():
    for rule in ("exact", "l1", "none"):
        out = drop_random(torch.zeros(3, 3), 0.3, 0, rule)
        assert torch.equal(out, torch.zeros(3, 3))


def test_outlier_band_by_hand_tensor_wise():
    # n = 10, gamma 0.1 -> drop floor(1.0) = 1 outlier (|1.0|); density 0.3 -> keep the next
    # 3 largest magnitudes: 0.9, 0.8, 0.7.
    delta = torch.tensor([0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 0.8, -0.4, 0.6, 1.0])
    out = outlier_band(delta, 0.3, 0.1)
    expected = torch.tensor([0.0, -0.9, 0.0, 0.0, -0.7, 0.0, 0.8, 0.0, 0.0, 0.0])
    assert torch.equal(out, expected)


def test_outlier_band_row_wise_differs_from_tensor_wise_by_hand():
    delta = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.4, 0.3, 0.2, 0.1]])
    # tensor-wise, n = 8: gamma 0.25 drops floor(2.0) = 2 (4 and 3); density 0.5 keeps the
    # next 4 (2, 1, 0.4, 0.3).
    whole = outlier_band(delta, 0.5, 0.25)
    assert torch.equal(whole, torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.4, 0.3, 0.0, 0.0]]))
    # row-wise, d = 4: drop floor(1.0) = 1 per row, keep the next 2 per row.
    rows = outlier_band(delta, 0.5, 0.25, per_row=True)
    assert torch.equal(rows, torch.tensor([[0.0, 3.0, 2.0, 0.0], [0.0, 0.3, 0.2, 0.0]]))


def test_outlier_band_zero_outliers_keeps_the_band():
    # n = 10, gamma 0.05 -> floor(0.5) = 0 outliers. mergekit's slice [n_bot : n - 0] is empty
    # and zeroes the whole tensor; here no outlier is removed and the top 3 are kept.
    delta = torch.tensor([0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 0.8, -0.4, 0.6, 1.0])
    out = outlier_band(delta, 0.3, 0.05)
    expected = torch.tensor([0.0, -0.9, 0.0, 0.0, 0.0, 0.0, 0.8, 0.0, 0.0, 1.0])
    assert torch.equal(out, expected)


def test_outlier_band_keeps_ties_at_the_band_floor():
    # Entries tied with the band's smallest kept magnitude are all kept.
    # |.| = [5, 3, 2, 2, 1]: gamma 0.2 drops 5; density 0.4 keeps floor(2.0) = 2 -> 3 and 2,
    # and the second 2 ties with the floor, so it is kept as well.
    delta = torch.tensor([5.0, -3.0, 2.0, -2.0, 1.0])
    assert torch.equal(outlier_band(delta, 0.4, 0.2), torch.tensor([0.0, -3.0, 2.0, -2.0, 0.0]))


def test_outlier_band_removes_no_more_than_the_asked_outliers():
    # |.| = [5, 5, 3, 2, 1]: gamma 0.2 asks for floor(1.0) = 1 outlier. Whichever tie rule is
    # used (drop exactly one 5 as the references' topk/argsort do, or keep both tied 5s as the
    # kept-ties rule would), at least one magnitude-5 entry must survive.
    delta = torch.tensor([5.0, -5.0, 3.0, 2.0, 1.0])
    out = outlier_band(delta, 0.4, 0.2)
    assert int((out.abs() == 5).sum()) >= 1


@pytest.mark.parametrize(("density", "gamma"), [(0.15, 0.006), (0.3, 0.1), (0.5, 0.0), (0.9, 0.2)])
@pytest.mark.parametrize("shape", [(1,), (7,), (300,), (5, 40), (3, 4, 20)])
def test_outlier_band_matches_argsort(shape, density, gamma):
    g = torch.Generator().manual_seed(shape[-1] + int(100 * density))
    delta = torch.randn(shape, generator=g)
    assert len(set(flat(delta.abs()))) == delta.numel()  # distinct magnitudes: no tie rule
    out = outlier_band(delta, density, gamma)
    assert torch.equal(out.double(), as_tensor(band(flat(delta), density, gamma), delta))
    rows = outlier_band(delta, density, gamma, per_row=True)
    per_row = [band(flat(r), density, gamma) for r in delta.reshape(-1, shape[-1])]
    assert torch.equal(rows.double(), as_tensor([v for r in per_row for v in r], delta))


def test_outlier_band_edge_shapes():
    # a 0-d scalar is one entry, never an outlier (floor(gamma * 1) = 0), so it is kept
    assert torch.equal(outlier_band(torch.tensor(-2.0), 0.1, 0.5), torch.tensor(-2.0))
    # gamma 1 removes everything
    assert torch.equal(outlier_band(torch.ones(3, 2), 0.5, 1.0), torch.zeros(3, 2))
    # empty tensor
    assert outlier_band(torch.zeros(0, 3), 0.5, 0.1).shape == (0, 3)
    # 1-D row-wise is the whole vector
    v = torch.tensor([3.0, -1.0, 2.0, 0.5])
    assert torch.equal(outlier_band(v, 0.5, 0.25, per_row=True), outlier_band(v, 0.5, 0.25))


def test_outlier_band_breaks_ties_at_the_outlier_threshold_by_index():
    # n = 10, gamma = 0.2 -> remove exactly 2 outliers; three entries tie at |5|: the
    # strictly larger 9 goes first, then the lower-indexed of the tied ones (index 1).
    delta = torch.tensor([0.0, 5.0, -5.0, 1.0, 9.0, 5.0, 2.0, 3.0, 4.0, 0.5])
    mask = band_mask(delta, 1.0, 0.2)
    assert mask.tolist() == [True, False, True, True, False, True, True, True, True, True]
    # per row (n = 5): one outlier each, |9| in row 0 and |5| in row 1
    rows = band_mask(delta.reshape(2, 5), 1.0, 0.2, per_row=True)
    assert rows.tolist() == [[True, True, True, True, False], [False, True, True, True, True]]
