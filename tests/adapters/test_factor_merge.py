"""Adapter factors merged without the dense update: concat (exact) and LoRA-LEGO, checked
against dense sums and a hand-built clustering."""

from __future__ import annotations

import torch

from amalgam.adapters.factor_merge import Factors, concat, lora_lego, units


def random_factors(g: torch.Generator, rank: int, d_out: int = 12, d_in: int = 10) -> Factors:
    return Factors(torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g))


def test_concat_is_the_sum_of_the_updates() -> None:
    g = torch.Generator().manual_seed(0)
    parts = [random_factors(g, r) for r in (2, 3, 4)]
    merged = concat(parts)
    assert merged.rank == 9
    torch.testing.assert_close(merged.delta(), sum(p.delta() for p in parts))
    torch.testing.assert_close(merged.norm(), torch.linalg.matrix_norm(merged.delta()))


def test_units_are_canonical_and_sum_to_the_update() -> None:
    g = torch.Generator().manual_seed(1)
    part = random_factors(g, 3)
    b, a = units([part])
    torch.testing.assert_close(b.T @ a, part.delta())
    torch.testing.assert_close(b.norm(dim=1), a.norm(dim=1))
    # the same unit written as (-2 b, -a / 2) lands on the same point
    twin = Factors(-2 * part.B[:, :1], -part.A[:1] / 2)
    tb, ta = units([twin])
    torch.testing.assert_close(tb[0], b[0])
    torch.testing.assert_close(ta[0], a[0])


def test_full_rank_keeps_every_unit_and_the_exact_sum() -> None:
    g = torch.Generator().manual_seed(2)
    parts = [random_factors(g, 2), random_factors(g, 3)]
    merged = lora_lego(parts, rank=5)
    torch.testing.assert_close(merged.delta(), concat(parts).delta(), atol=1e-5, rtol=1e-5)


def test_one_unit_in_many_spellings_merges_to_their_sum() -> None:
    """Three adapters holding the same rank-1 update at different scales and signs: one
    cluster, whose unit is that direction, rescaled to the summed update's norm."""
    g = torch.Generator().manual_seed(3)
    b, a = torch.randn(12, 1, generator=g), torch.randn(1, 10, generator=g)
    parts = [Factors(b, a), Factors(-3 * b, -a / 3), Factors(0.5 * b, 2 * a)]
    merged = lora_lego(parts, rank=1)
    assert merged.rank == 1
    torch.testing.assert_close(merged.delta(), 3 * (b @ a), atol=1e-5, rtol=1e-4)


def test_clusters_match_a_hand_built_grouping() -> None:
    """Units scattered tightly around three known directions: k-means must find those three
    groups, and the merged adapter must equal the naive computation over the known groups
    (centroid per group, norm reweighting, then the module-wide output factor)."""
    g = torch.Generator().manual_seed(4)
    dirs_b = torch.linalg.qr(torch.randn(12, 3, generator=g))[0].T * 2
    dirs_a = torch.linalg.qr(torch.randn(10, 3, generator=g))[0].T * 2
    parts, group = [], []
    for _ in range(4):  # four adapters, each with a noisy copy of each direction
        noise = 0.01
        B = (dirs_b + noise * torch.randn(3, 12, generator=g)).T
        A = dirs_a + noise * torch.randn(3, 10, generator=g)
        parts.append(Factors(B, A))
        group += [0, 1, 2]
    merged = lora_lego(parts, rank=3, seed=7)

    b, a = units(parts)  # the canonical units, as the method sees them
    labels = torch.tensor(group)
    cols, rows = [], []
    for c in range(3):
        mb, ma = b[labels == c].mean(0), a[labels == c].mean(0)
        target = (b[labels == c].norm(dim=1) * a[labels == c].norm(dim=1)).mean()
        f = torch.sqrt(target / (mb.norm() * ma.norm()))
        cols.append(mb * f)
        rows.append(ma * f)
    naive = torch.stack(cols, 1) @ torch.stack(rows, 0)
    naive *= torch.linalg.matrix_norm(concat(parts).delta()) / torch.linalg.matrix_norm(naive)
    torch.testing.assert_close(merged.delta(), naive, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        torch.linalg.matrix_norm(merged.delta()), torch.linalg.matrix_norm(concat(parts).delta())
    )


def test_same_seed_same_adapter() -> None:
    g = torch.Generator().manual_seed(5)
    parts = [random_factors(g, 4) for _ in range(3)]
    one, two = lora_lego(parts, rank=4, seed=11), lora_lego(parts, rank=4, seed=11)
    assert torch.equal(one.B, two.B) and torch.equal(one.A, two.A)
    assert one.rank <= 4
