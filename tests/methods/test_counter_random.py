"""Counter-based random draws: known answers from a Python loop, block independence,
uniformity, and DARE's keep rate and rescale under the new stream."""

from __future__ import annotations

import math

import pytest
import torch

from amalgam.methods.base import MergeContext
from amalgam.methods.counter_random import CounterStream, lanes, stream_key, uniform
from amalgam.methods.sparsify import drop_random

from .naive import naive_key, naive_lane, naive_uniform

INDICES = [0, 1, 2, 3, 7, 1000, 1001, 65_537, 2**31 - 1, 2**31, 2**33 + 5, 2**40 + 2]


def test_splitmix64_first_output_matches_the_published_value():
    # SplitMix64 seeded with 0: the first output is 0xE220A8397B1DCDAF (Vigna's splitmix64.c).
    # Our entry 0 is its low half, entry 1 its high half (lanes keep 31 bits of each).
    assert naive_lane(0, 0) == 0x7B1DCDAF & 0x7FFFFFFF
    assert naive_lane(0, 1) == 0xE220A839 & 0x7FFFFFFF
    assert int(lanes(0, 0, 2)[0]) == 0x7B1DCDAF & 0x7FFFFFFF
    assert int(lanes(0, 0, 2)[1]) == 0xE220A839 & 0x7FFFFFFF


@pytest.mark.parametrize("seed,tensor,model", [(0, "w", 0), (7, "model.embed_tokens.weight", 3)])
def test_lanes_and_uniforms_match_the_python_loop(seed, tensor, model):
    key = stream_key(seed, tensor, model)
    assert key & ((1 << 64) - 1) == naive_key(seed, tensor, model)
    assert MergeContext(name=tensor, seed=seed).random_key(model) == key
    for i in INDICES:
        assert int(lanes(key, i, i + 1)[0]) == naive_lane(naive_key(seed, tensor, model), i)
        assert float(uniform(key, i, i + 1)[0]) == naive_uniform(naive_key(seed, tensor, model), i)


def test_any_block_equals_the_slice_of_the_whole_draw():
    key = stream_key(3, "a.weight", 1)
    whole = lanes(key, 0, 10_001)
    for start, stop in [(0, 1), (1, 2), (5, 6), (1, 10_001), (333, 4_444), (4_443, 9_000)]:
        assert torch.equal(lanes(key, start, stop), whole[start:stop]), (start, stop)
        assert torch.equal(uniform(key, start, stop), uniform(key, 0, 10_001)[start:stop])
    assert lanes(key, 5, 5).numel() == 0


def test_hashing_in_small_pieces_gives_the_same_bytes(monkeypatch):
    # A stream hashes at most CounterStream.WORDS counters at once: pieces of 3 words (6
    # entries) must give the whole draw, whatever the start's parity and the range's length.
    key = stream_key(9, "b", 2)
    whole = lanes(key, 0, 1_000)
    monkeypatch.setattr(CounterStream, "WORDS", 3)
    stream = CounterStream(key)
    for start, stop in [(0, 1_000), (1, 2), (5, 17), (6, 12), (7, 999), (0, 6)]:
        assert torch.equal(stream.lanes(start, stop), whole[start:stop]), (start, stop)
        assert torch.equal(stream.uniform(start, stop), uniform(key, 0, 1_000)[start:stop])


def test_thread_count_does_not_change_the_bytes():
    key = stream_key(0, "w", 0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lanes(key, 17, 300_017)
        torch.set_num_threads(2)
        two = lanes(key, 17, 300_017)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_uniformity_over_a_million_draws():
    # U[0, 1): mean 1/2 (sd of the mean sqrt(1/12/n)), variance 1/12 (sd of the sample
    # variance ~ sqrt(1/180/n)); 16 equal bins each hold 1/16 (chi-square with 15 dof,
    # 99.9 % quantile 37.7); a keep at 0.3 holds 0.3 (sd sqrt(.21/n)). Allow 5 sd.
    n = 1_000_000
    u = uniform(stream_key(11, "model.layers.0.mlp.up_proj.weight", 2), 0, n).double()
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(float(u.var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)
    chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
    assert chi2 < 37.7
    keep = float((u < 0.3).double().mean())
    assert abs(keep - 0.3) < 5 * math.sqrt(0.21 / n)
    # Neighbouring entries (the two halves of one 64-bit word) are uncorrelated.
    corr = float(torch.corrcoef(torch.stack([u[0::2], u[1::2]]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(n / 2)


def test_streams_of_other_models_tensors_and_seeds_are_independent():
    n, p = 200_000, 0.5
    keys = [
        stream_key(0, "w", 0),
        stream_key(0, "w", 1),
        stream_key(0, "v", 0),
        stream_key(1, "w", 0),
    ]
    masks = [uniform(k, 0, n) < p for k in keys]
    for other in masks[1:]:
        both = float((masks[0] & other).double().mean())
        assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)


def test_dare_keep_rate_and_exact_rescale_over_a_million_entries():
    # drop_random keeps entry i iff its lane < round(density * 2^31), and exact-rescales by
    # 2^31 / that cutoff: checked entry by entry against the lanes, then in distribution.
    n, density = 1_000_000, 0.1
    key = stream_key(5, "w", 0)
    delta = torch.full((1000, 1000), 0.5)
    out = drop_random(delta, density, key, "exact")
    cutoff = round(density * 2**31)
    expected_kept = (lanes(key, 0, n) < cutoff).reshape(1000, 1000)
    assert torch.equal(out != 0, expected_kept)
    assert torch.equal(
        out[expected_kept], torch.full((int(expected_kept.sum()),), 0.5 * 2**31 / cutoff)
    )
    kept = float(expected_kept.double().mean())
    assert abs(kept - density) < 5 * math.sqrt(density * (1 - density) / n)
    assert abs(float(out.double().mean()) - 0.5) < 5 * 0.5 * math.sqrt(
        (1 - density) / (density * n)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_draws_equal_cpu_draws():
    key = stream_key(2, "w", 4)
    assert torch.equal(lanes(key, 3, 1_000_003, "cuda").cpu(), lanes(key, 3, 1_000_003))
    assert torch.equal(uniform(key, 3, 1_000_003, "cuda").cpu(), uniform(key, 3, 1_000_003))
    delta = torch.randn(700, 900, generator=torch.Generator().manual_seed(0))
    for rule in ("exact", "l1", "none"):
        gpu = drop_random(delta.cuda(), 0.3, key, rule).cpu()
        assert torch.equal(gpu, drop_random(delta, 0.3, key, rule)), rule
