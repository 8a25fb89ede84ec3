"""The compiled kernels: one pass over a flat entry range, every model at once, in float32,
each result stored in the output's dtype (``scalar.store``: as ``Tensor.to`` rounds).

Each kernel repeats, entry by entry, the float32 operations of the torch path in
``linear.linear`` and ``task_vectors.task_vector_merge`` in the same order (``add(x, alpha=w)``
is one fused multiply-add, as ATen computes it on AVX2 and AVX-512 CPUs), so the outputs are the
same bits. The range is walked in blocks of ``BLOCK`` entries: each step is a branch-free loop
over one block (which LLVM vectorises) on scratch rows that stay in the L1/L2 cache, so every
input entry is read from memory once. ``magnitude_counts`` histograms the float32 bits of
|x - base| over a range (the passes of ``select``'s radix selection); ``magnitude_sample``
samples them and ``bracket_counts`` counts them around a bracket (its one-pass selection);
``drop_norms`` sums DARE's L1 norms before and after the drop; ``nonfinite_count`` finds
NaN/Inf by their exponent bits.
They release the GIL:
``launch`` runs ranges on threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from amalgam.methods.kernels.codes import (
    CLAMP_DIVIDE,
    DIVIDE,
    DROP,
    GUARD_DIVIDE,
    NO_VOTE,
    TRIM,
    VOTE_SUM,
)
from amalgam.methods.kernels.counter import draw, kept
from amalgam.methods.kernels.scalar import WIDTH, add_widened, as_f32, f32_bits, fma, sign, store

BLOCK = 1024
ZERO, ONE = np.float32(0.0), np.float32(1.0)
TINY = np.float32(1e-8)
BINS = 1 << 16
NORM_CHUNK = (
    1 << 16
)  # entries per partial sum of ``drop_norms``: the order does not depend on threads
LANES = WIDTH  # float64 accumulators per partial sum (entry e adds into e % LANES): 8
COUNT_CHUNK = 1 << 30  # entries counted in int32 before they are added to the int64 counts
HALF, LOW16, ABS = np.uint32(16), np.uint32(0xFFFF), np.uint32(0x7FFFFFFF)
ONE_BIT = np.uint32(1)


@njit(nogil=True, cache=True)
def linear_block(xs, weights, normalize, total, start, stop, out):
    """out[e] = (sum_i w_i x_i[e]) [/ total] for e in [start, stop)."""
    acc = np.empty(BLOCK, np.float32)
    for s in range(start, stop, BLOCK):
        n = min(BLOCK, stop - s)
        acc[:n] = ZERO
        for i in range(len(xs)):
            x, w = xs[i][s : s + n], weights[i]
            for j in range(n):
                acc[j] = fma(as_f32(x[j]), w, acc[j])
        if normalize:
            for j in range(n):
                acc[j] = acc[j] / total
        out_s = out[s : s + n]
        for j in range(n):
            store(out_s, j, acc[j])


@njit(nogil=True, cache=True)
def task_vector_block(
    base, xs, rules, thresholds, cutoffs, keys, scales, weights, sides, votes_by, vote,
    norm, norm_value, lam, start, stop, out,
):  # fmt: skip
    """out[e] = base + lam * combine(sparsified task vectors) for e in [start, stop).

    ``rules[i]``: KEEP_ALL, TRIM (keep |d| >= thresholds[i]) or DROP (DARE's counter lane
    below cutoffs[i], stream keys[i], then times scales[i]). ``vote``: NO_VOTE (a plain
    weighted sum), VOTE_SUM or VOTE_COUNT (``votes_by``: +-1 or 0 per model); ``sides``: the
    sign of each weight (0: the model never agrees). ``norm``: how the sum is divided.
    """
    m = len(xs)
    deltas = np.empty((m, BLOCK), np.float32)
    b = np.empty(BLOCK, np.float32)
    mixed = np.empty(BLOCK, np.float32)
    votes = np.empty(BLOCK, np.float32)
    divisor = np.empty(BLOCK, np.float32)
    words = np.empty(BLOCK // 2 + 1, np.uint64)
    for s in range(start, stop, BLOCK):
        n = min(BLOCK, stop - s)
        base_s = base[s : s + n]
        for j in range(n):
            b[j] = as_f32(base_s[j])
        for i in range(m):
            x, d, threshold, scale = xs[i][s : s + n], deltas[i], thresholds[i], scales[i]
            for j in range(n):
                d[j] = as_f32(x[j]) - b[j]
            if rules[i] == TRIM:
                for j in range(n):
                    d[j] = d[j] * (ONE if abs(d[j]) >= threshold else ZERO)
            elif rules[i] == DROP:
                cutoff, drawn = cutoffs[i], draw(keys[i], s, n, words)
                for j in range(n):  # times a scale of 1: the same bits
                    d[j] = d[j] * (ONE if kept(drawn[j], cutoff) else ZERO) * scale
        mixed[:n] = ZERO
        if vote == NO_VOTE:
            for i in range(m):
                d, w = deltas[i], weights[i]
                for j in range(n):
                    mixed[j] = fma(d[j], w, mixed[j])
            if norm == DIVIDE:
                for j in range(n):
                    mixed[j] = mixed[j] / norm_value
        else:
            votes[:n] = ZERO
            for i in range(m):
                d, w, by = deltas[i], weights[i], votes_by[i]
                if vote == VOTE_SUM:
                    for j in range(n):
                        votes[j] = fma(d[j], w, votes[j])
                else:
                    for j in range(n):
                        votes[j] = fma(sign(d[j]), by, votes[j])
            divisor[:n] = ZERO
            for i in range(m):
                if sides[i] == 0:
                    continue
                d, w, side = deltas[i], weights[i], np.float32(sides[i])
                for j in range(n):
                    # the elected sign is -1 where the votes are negative, else +1
                    agree = d[j] * (side * (-ONE if votes[j] < ZERO else ONE)) > ZERO
                    mixed[j] = mixed[j] + (w * d[j] if agree else ZERO)
                    divisor[j] = divisor[j] + (w if agree else ZERO)
            if norm == CLAMP_DIVIDE:
                for j in range(n):
                    mixed[j] = mixed[j] / max(divisor[j], norm_value)
            elif norm == GUARD_DIVIDE:
                for j in range(n):
                    tiny = TINY - abs(divisor[j]) > ZERO
                    mixed[j] = mixed[j] / (divisor[j] + (ONE - divisor[j]) if tiny else divisor[j])
        out_s = out[s : s + n]
        for j in range(n):
            store(out_s, j, fma(mixed[j], lam, b[j]))


@njit(nogil=True, cache=True, inline="always")
def block_magnitudes(x, base, s, m):
    """m[j] = the float32 bits of |x[s + j] - base[s + j]| (|x[s + j]| where ``base`` is None)
    for j < len(m), on slices: a loop LLVM vectorises (indexing the whole arrays, with their
    bounds, stays scalar)."""
    xb = x[s : s + len(m)]
    if base is None:
        for j in range(len(m)):
            m[j] = f32_bits(as_f32(xb[j])) & ABS
    else:
        bb = base[s : s + len(m)]
        for j in range(len(m)):
            m[j] = f32_bits(as_f32(xb[j]) - as_f32(bb[j])) & ABS


@njit(nogil=True, cache=True)
def magnitude_counts(x, base, high, start, stop):
    """Counts (int64, BINS) over e in [start, stop) of the float32 bits of |x[e] - base[e]|
    (|x[e]| where ``base`` is None): of their high 16 bits, or, with ``high`` >= 0, of the low
    16 bits of those whose high 16 bits equal ``high``."""
    counts = np.zeros(BINS, np.int64)
    scratch = np.zeros(BINS, np.int32)  # a quarter of the cache footprint of int64 counts
    mags = np.empty(BLOCK, np.uint32)
    wanted = np.uint32(max(high, 0))
    for s in range(start, stop, COUNT_CHUNK):
        e = min(s + COUNT_CHUNK, stop)
        scratch[:] = 0
        for b in range(s, e, BLOCK):
            m = mags[: min(BLOCK, e - b)]
            block_magnitudes(x, base, b, m)
            if high < 0:
                for j in range(len(m)):
                    scratch[m[j] >> HALF] += 1
            else:
                for j in range(len(m)):
                    if m[j] >> HALF == wanted:
                        scratch[m[j] & LOW16] += 1
        counts += scratch
    return counts


@njit(nogil=True, cache=True)
def magnitude_sample(x, base, starts, out):
    """out[r] = the float32 bits of |x - base| over the run of entries from starts[r]."""
    for r in range(len(starts)):
        block_magnitudes(x, base, starts[r], out[r])


@njit(nogil=True, cache=True)
def bracket_counts(x, base, lo, hi, start, stop, inside):
    """Over e in [start, stop), with m the float32 bits of |x[e] - base[e]| and lo <= hi: the
    counts of m > hi, m == hi, m == lo, and of lo < m < hi, those m gathered into ``inside``.
    Per block: the magnitudes and the counts (vectorised sums of compares), then the few
    entries inside copied out (a rarely taken branch). With fewer than BLOCK slots left in
    ``inside`` it stops, counting -1 inside."""
    above = at_hi = at_lo = 0
    n = 0
    room = len(inside) - BLOCK
    width = hi - lo - ONE_BIT if hi > lo else hi - hi  # m - lo - 1 wraps for m <= lo
    scratch = np.empty(BLOCK, np.uint32)
    for s in range(start, stop, BLOCK):
        if n > room:
            return above, at_hi, at_lo, -1
        m = scratch[: min(BLOCK, stop - s)]
        block_magnitudes(x, base, s, m)
        block_above = block_hi = block_lo = np.int32(0)
        for j in range(len(m)):
            block_above += np.int32(m[j] > hi)
            block_hi += np.int32(m[j] == hi)
            block_lo += np.int32(m[j] == lo)
        above += block_above
        at_hi += block_hi
        at_lo += block_lo
        for j in range(len(m)):
            if m[j] - lo - ONE_BIT < width:  # lo < m < hi, in one unsigned compare
                inside[n] = m[j]
                n += 1
    return above, at_hi, at_lo, n


@njit(nogil=True, cache=True)
def drop_norms(x, base, key, cutoff, first, last, partials):
    """For chunks c in [first, last) of ``NORM_CHUNK`` entries: partials[c] = (sum |d|, sum of
    |d| kept by DARE's lanes), d = x - base in float32, summed in float64 over ``LANES``
    accumulators (entry e into e % LANES, in increasing e) then added in lane order: a fixed
    order of sums. Per block, |d| and its kept part go to float32 rows in one vectorised loop,
    then ``add_widened`` adds them into the accumulators, lanes side by side."""
    n = len(x)
    words = np.empty(BLOCK // 2 + 1, np.uint64)
    whole = np.empty(BLOCK, np.float32)
    part = np.empty(BLOCK, np.float32)
    for c in range(first, last):
        before = np.zeros(LANES, np.float64)
        after = np.zeros(LANES, np.float64)
        for s in range(c * NORM_CHUNK, min((c + 1) * NORM_CHUNK, n), BLOCK):
            k = min(BLOCK, n - s)
            xs, bs, drawn = x[s : s + k], base[s : s + k], draw(key, s, k, words)
            for j in range(k):
                d = abs(as_f32(xs[j]) - as_f32(bs[j]))
                whole[j] = d
                part[j] = d if kept(drawn[j], cutoff) else ZERO
            # s is a multiple of LANES: entry s + j adds into lane j % LANES
            add_widened(before, whole, k // LANES)
            add_widened(after, part, k // LANES)
            for j in range(k - k % LANES, k):
                before[j % LANES] += np.float64(whole[j])
                after[j % LANES] += np.float64(part[j])
        partials[c, 0] = 0.0
        partials[c, 1] = 0.0
        for a in range(LANES):
            partials[c, 0] += before[a]
            partials[c, 1] += after[a]


@njit(nogil=True, cache=True)
def nonfinite_count(bits, exponent):
    """How many entries of ``bits`` (a float dtype's bit patterns as unsigned integers) have
    every ``exponent`` bit set: the NaNs and infinities."""
    count = 0
    for i in range(len(bits)):
        count += (bits[i] & exponent) == exponent
    return count
