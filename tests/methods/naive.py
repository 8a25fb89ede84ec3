"""Naive, loop-based formulations of the merge math, written independently of amalgam's code.

Everything here works on flat Python lists of floats (double precision) with explicit loops
and full sorts, so that the tests compare amalgam's vectorised code against a second,
obviously-correct computation rather than against itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def flat(t: torch.Tensor) -> list[float]:
    """A tensor's entries as Python floats, row-major."""
    return [float(v) for v in t.detach().double().reshape(-1).tolist()]


def as_tensor(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Values in double precision, shaped like ``like``."""
    return torch.tensor(list(values), dtype=torch.float64).reshape(like.shape)


def floor_count(n: int, density: float) -> int:
    """floor(density * n) (float product, as mergekit computes it), at least 1 when n > 0."""
    return min(n, max(1, math.floor(density * n))) if n else 0


def kth_largest_by_sort(values: Sequence[float], k: int) -> float:
    """The k-th largest value (1-based), by a full sort."""
    return sorted(values, reverse=True)[k - 1]


def trim(delta: Sequence[float], density: float) -> list[float]:
    """TIES trim: keep entries whose magnitude reaches the k-th largest magnitude (ties kept)."""
    if density >= 1.0:
        return list(delta)
    k = floor_count(len(delta), density)
    threshold = kth_largest_by_sort([abs(v) for v in delta], k)
    return [v if abs(v) >= threshold else 0.0 for v in delta]


def sign(v: float) -> int:
    return (v > 0) - (v < 0)


def disjoint_merge(
    deltas: Sequence[Sequence[float]],
    weights: Sequence[float],
    consensus: str = "sum",
    normalize: bool = True,
) -> list[float]:
    """TIES elect + disjoint merge, one entry at a time with explicit per-model sign votes.

    The elected sign is +1 when the vote is >= 0 (a zero vote elects +1). Only entries whose
    weighted value has the elected sign contribute; a divisor below 1e-8 becomes 1.
    """
    out = []
    for j in range(len(deltas[0])):
        weighted = [w * d[j] for w, d in zip(weights, deltas, strict=True)]
        vote = sum(weighted) if consensus == "sum" else sum(sign(v) for v in weighted)
        elected = 1 if vote >= 0 else -1
        num = 0.0
        den = 0.0
        for w, v in zip(weights, weighted, strict=True):
            if sign(v) == elected:
                num += v
                den += w
        if normalize:
            out.append(num / (den if abs(den) >= 1e-8 else 1.0))
        else:
            out.append(num)
    return out


def weighted_sum(
    deltas: Sequence[Sequence[float]], weights: Sequence[float], normalize: bool
) -> list[float]:
    """sum_i w_i d_i, divided by sum_i w_i when normalizing (a divisor below 1e-8 becomes 1)."""
    total = sum(weights)
    div = (total if abs(total) >= 1e-8 else 1.0) if normalize else 1.0
    out = []
    for j in range(len(deltas[0])):
        out.append(sum(w * d[j] for w, d in zip(weights, deltas, strict=True)) / div)
    return out


def band(delta: Sequence[float], density: float, gamma: float) -> list[float]:
    """Breadcrumbs band by a full argsort (distinct magnitudes assumed): drop the floor(gamma n)
    largest, keep the next max(1, floor(density n)) (capped by what is left), zero the rest."""
    n = len(delta)
    n_top = math.floor(gamma * n)
    n_keep = min(floor_count(n, density), n - n_top)
    order = sorted(range(n), key=lambda i: abs(delta[i]))  # ascending magnitude
    kept = set(order[n - n_top - n_keep : n - n_top]) if n_keep > 0 else set()
    return [delta[i] if i in kept else 0.0 for i in range(n)]


def slerp(t: float, a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Shoemake's formula with the angle between a and b computed explicitly; lerp when
    |cos| > 0.9995. A zero vector is left unnormalised (mergekit's eps rule)."""
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    ua = [x / na for x in a] if na > 1e-8 else list(a)
    ub = [x / nb for x in b] if nb > 1e-8 else list(b)
    cos = sum(x * y for x, y in zip(ua, ub, strict=True))
    if abs(cos) > 0.9995:
        return [(1 - t) * x + t * y for x, y in zip(a, b, strict=True)]
    theta = math.acos(max(-1.0, min(1.0, cos)))
    ca = math.sin((1 - t) * theta) / math.sin(theta)
    cb = math.sin(t * theta) / math.sin(theta)
    return [ca * x + cb * y for x, y in zip(a, b, strict=True)]


def stock_ratio(deltas: Sequence[Sequence[float]]) -> float:
    """Model Stock's t from the mean pairwise cosine (norm product clamped >= 1e-6, cos to
    [-1, 1]); t = k cos / (1 + (k - 1) cos), clamped to [0, 1] (0 when the denominator is 0)."""
    k = len(deltas)
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            dot = sum(x * y for x, y in zip(deltas[i], deltas[j], strict=True))
            ni = math.sqrt(sum(x * x for x in deltas[i]))
            nj = math.sqrt(sum(x * x for x in deltas[j]))
            cosines.append(max(-1.0, min(1.0, dot / max(ni * nj, 1e-6))))
    cos = sum(cosines) / len(cosines)
    denom = 1 + (k - 1) * cos
    if abs(denom) <= 1e-12:
        return 0.0
    return max(0.0, min(1.0, k * cos / denom))


def naive_key(seed: int, tensor: str, model_index: int) -> int:
    """The documented stream key: the first 8 bytes of SHA-256("seed\\0tensor\\0model"),
    little-endian, unsigned."""
    import hashlib  # only the counter-based stream's reference needs it

    digest = hashlib.sha256(f"{seed}\0{tensor}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def naive_lane(key: int, index: int) -> int:
    """Entry ``index``'s 31-bit lane, by the SplitMix64 definition on Python integers: the
    output for counter c = index // 2 is mix(key + (c + 1) * golden mod 2^64); an even index
    takes its low 32 bits, an odd one its high 32 bits; the lane is their low 31 bits."""
    m = (1 << 64) - 1
    z = (key + (index // 2 + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    z ^= z >> 31
    half = (z >> 32) if index % 2 else (z & 0xFFFFFFFF)
    return half & 0x7FFFFFFF


def naive_uniform(key: int, index: int) -> float:
    """Entry ``index``'s uniform draw: the top 24 of its 31 lane bits, times 2^-24."""
    return (naive_lane(key, index) >> 7) / 2**24
