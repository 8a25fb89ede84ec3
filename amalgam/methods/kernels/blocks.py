"""The compiled kernels: one pass over a flat entry range, every model at once, in float32.

Each kernel repeats, entry by entry, the float32 operations of the torch path in
``linear.linear`` and ``task_vectors.task_vector_merge`` in the same order (``add(x, alpha=w)``
is one fused multiply-add, as ATen computes it on AVX2 and AVX-512 CPUs), so the outputs are the
same bits. They release the GIL: ``launch`` runs disjoint ranges on threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from amalgam.methods.kernels.counter import kept, lane, splitmix64
from amalgam.methods.kernels.scalar import as_f32, fma, sign

# per-model sparsification rules
KEEP_ALL, TRIM, DROP = 0, 1, 2
# sign election
NO_VOTE, VOTE_SUM, VOTE_COUNT = 0, 1, 2
# normalisation of the merged task vector
NO_DIVISION, DIVIDE, CLAMP_DIVIDE, GUARD_DIVIDE = 0, 1, 2, 3

ZERO, ONE = np.float32(0.0), np.float32(1.0)
TINY = np.float32(1e-8)


@njit(nogil=True, cache=True)
def linear_block(xs, weights, normalize, total, start, stop, out):
    """out[e] = (sum_i w_i x_i[e]) [/ total] for e in [start, stop)."""
    for e in range(start, stop):
        acc = ZERO
        for i in range(len(xs)):
            acc = fma(as_f32(xs[i][e]), weights[i], acc)
        if normalize:
            acc = acc / total
        out[e] = acc


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
    d = np.empty(m, np.float32)
    words = np.zeros(m, np.uint64)
    for e in range(start, stop):
        b = as_f32(base[e])
        for i in range(m):
            x = as_f32(xs[i][e]) - b
            rule = rules[i]
            if rule == TRIM:
                x = x * (ONE if abs(x) >= thresholds[i] else ZERO)
            elif rule == DROP:
                if (e & 1) == 0 or e == start:
                    words[i] = splitmix64(keys[i], np.uint64(e >> 1))
                x = x * (ONE if kept(lane(words[i], e), cutoffs[i]) else ZERO)
                if scales[i] != ONE:
                    x = x * scales[i]
            d[i] = x
        mixed = ZERO
        if vote == NO_VOTE:
            for i in range(m):
                mixed = fma(d[i], weights[i], mixed)
            if norm == DIVIDE:
                mixed = mixed / norm_value
        else:
            votes = ZERO
            for i in range(m):
                if vote == VOTE_SUM:
                    votes = fma(d[i], weights[i], votes)
                else:
                    votes = fma(sign(d[i]), votes_by[i], votes)
            elected = -ONE if votes < ZERO else ONE
            divisor = ZERO
            for i in range(m):
                if sides[i] == 0:
                    continue
                side = elected if sides[i] > 0 else -elected
                if d[i] * side > ZERO:
                    mixed = mixed + weights[i] * d[i]
                    divisor = divisor + weights[i]
            if norm == CLAMP_DIVIDE:
                mixed = mixed / max(divisor, norm_value)
            elif norm == GUARD_DIVIDE:
                if TINY - abs(divisor) > ZERO:
                    divisor = divisor + (ONE - divisor)
                mixed = mixed / divisor
        out[e] = fma(mixed, lam, b)
