"""ComPEFT compression: the per-tensor math by hand, bit-exact storage and exact sizes."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from amalgam.compress import codec, compeft
from amalgam.compress.compeft import kept_count


def test_top_k_sign_and_mean_scale_match_a_hand_computation() -> None:
    tau = torch.tensor([[0.5, -2.0, 0.1], [3.0, -0.2, 0.0]])
    t = compeft(tau, density=0.5, scale="mean")
    # k = ceil(0.5 * 6) = 3; the three largest |tau| are 3.0 (pos 3), -2.0 (pos 1), 0.5 (pos 0)
    assert t.positions.tolist() == [0, 1, 3]
    assert t.negative.tolist() == [False, True, False]
    s = (0.5 + 2.0 + 3.0) / 3
    assert t.scale == pytest.approx(s)
    expected = torch.tensor([[s, -s, 0.0], [s, 0.0, 0.0]])
    torch.testing.assert_close(t.delta(), expected)


def test_std_scale_is_alpha_times_the_population_std_of_the_whole_tensor() -> None:
    values = [0.5, -2.0, 0.1, 3.0, -0.2, 0.0]
    t = compeft(torch.tensor(values), density=0.3, scale="std", alpha=2.5)
    assert t.positions.tolist() == [1, 3]  # k = ceil(0.3 * 6) = 2: |-2.0| and |3.0|
    assert t.negative.tolist() == [True, False]
    assert t.scale == pytest.approx(2.5 * statistics.pstdev(values), rel=1e-6)


def test_zero_entries_are_never_kept_and_a_zero_tensor_keeps_nothing() -> None:
    t = compeft(torch.tensor([0.0, 1.5, 0.0, -0.5]), density=1.0)
    assert t.positions.tolist() == [1, 3]
    assert t.negative.tolist() == [False, True]
    empty = compeft(torch.zeros(3, 3), density=0.5)
    assert empty.positions.numel() == 0 and empty.scale == 0.0
    torch.testing.assert_close(empty.delta(), torch.zeros(3, 3))


def test_kept_count_is_the_ceiling_and_at_least_one() -> None:
    assert [kept_count(n, d) for n, d in [(10, 0.1), (10, 0.15), (7, 0.01), (5, 1.0)]] == [
        1,
        2,
        1,
        5,
    ]
    assert kept_count(100, 0.07) == 7  # no float drift: 0.07 * 100 = 7.000000000000001


@pytest.mark.parametrize(
    ("numel", "density", "kind", "positions_bytes"),
    [
        (4096, 0.5, "bitmask", 4096 // 8),
        # k = 410, L = floor(log2(4096 / 410)) = 3: 410 * 3 low bits, 410 + 4095 >> 3 high bits
        (4096, 0.1, "elias_fano", math.ceil(410 * 3 / 8) + math.ceil((410 + 511) / 8)),
        (1000, 0.001, "indices", 2),  # k = 1: one int16 index (Elias-Fano: 3 bytes)
    ],
)
def test_encoding_round_trips_bit_exactly_in_the_predicted_bytes(
    numel: int, density: float, kind: str, positions_bytes: int
) -> None:
    g = torch.Generator().manual_seed(0)
    t = compeft(torch.randn(numel, generator=g), density)
    k = t.positions.numel()
    stored = codec.encode("w", t)
    assert codec.encoding(numel, k) == kind
    assert codec.payload_bytes(codec.entries_of(stored)) == positions_bytes + math.ceil(k / 8) + 4
    back = codec.decode((numel,), k, stored[0][1], stored[1][1], float(stored[2][1]))
    assert torch.equal(back.positions, t.positions)
    assert torch.equal(back.negative, t.negative)
    assert torch.equal(back.delta(), t.delta())


def test_elias_fano_by_hand() -> None:
    # n = 16, positions 1 5 6 14, L = floor(log2(16 / 4)) = 2.
    # low parts 1 1 2 2 as 2-bit little-endian groups: 10 10 01 01 -> byte 1 + 4 + 32 + 128
    # high parts 0 1 1 3, bit (high + i) set: bits 0 2 3 6 of 4 + (15 >> 2) = 7 -> 1 + 4 + 8 + 64
    positions = torch.tensor([1, 5, 6, 14])
    assert codec.position_bytes(16, 4) == {"bitmask": 2, "elias_fano": 2, "indices": 8}
    assert codec.encoding(16, 4) == "bitmask"  # the bitmask wins ties
    code = codec._elias_fano(positions.numpy(), 16)
    assert code.tolist() == [165, 77]
    assert codec._elias_fano_decode(code, 16, 4).tolist() == [1, 5, 6, 14]


def test_elias_fano_without_low_bits_and_at_the_ends() -> None:
    for numel, positions in [(5, [0, 1, 3, 4]), (1000, [0, 999]), (70000, [69999])]:
        p = torch.tensor(positions)
        code = codec._elias_fano(p.numpy(), numel)
        assert codec._elias_fano_decode(code, numel, len(positions)).tolist() == positions


def test_bits_are_packed_little_endian() -> None:
    bits = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    assert codec.pack_bits(bits).tolist() == [1, 2]
    assert torch.equal(codec.unpack_bits(codec.pack_bits(bits), 10), bits)


def test_index_width_grows_with_the_tensor() -> None:
    assert codec.index_dtype(32768) == torch.int16
    assert codec.index_dtype(32769) == torch.int32
    assert codec.index_dtype(2**31 + 1) == torch.int64
