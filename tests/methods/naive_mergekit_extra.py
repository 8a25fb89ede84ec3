"""Loop-based formulations of mergekit's nearswap, arcee_fusion, ram and ramplus_tl, written
from their documented formulas (docs/methods.md), independently of amalgam's code: every
entry computed one at a time in double precision."""

from __future__ import annotations

import math
from collections.abc import Sequence


def nearswap(a: Sequence[float], b: Sequence[float], t: float) -> list[float]:
    out = []
    for x, y in zip(a, b, strict=True):
        w = min(1.0, max(0.0, t / max(abs(x - y), 1e-6)))
        out.append(w * y + (1 - w) * x)
    return out


def _softmax(row: Sequence[float]) -> list[float]:
    top = max(row)
    e = [math.exp(v - top) for v in row]
    s = sum(e)
    return [v / s for v in e]


def arcee_fusion(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """``a``, ``b``: rows (vectors along the last dimension)."""
    scores = []
    for ra, rb in zip(a, b, strict=True):
        p = [v + 1e-8 for v in _softmax(rb)]
        q = [v + 1e-8 for v in _softmax(ra)]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        scores.append([abs(y - x) * kl for x, y in zip(ra, rb, strict=True)])
    ordered = sorted(v for row in scores for v in row)
    n = len(ordered)

    def quantile(q: float) -> float:
        return ordered[math.floor(q * (n - 1))]

    threshold = quantile(0.5) + 1.5 * (quantile(0.75) - quantile(0.25))
    return [
        [y if s >= threshold else x for x, y, s in zip(ra, rb, rs, strict=True)]
        for ra, rb, rs in zip(a, b, scores, strict=True)
    ]


def ram(
    base: Sequence[float],
    models: Sequence[Sequence[float]],
    epsilon: float,
    r: float = 0.0,
    alpha: float = 0.0,
    plus: bool = False,
) -> list[float]:
    n = len(base)
    taus = [[m[j] - base[j] for j in range(n)] for m in models]
    active = [[abs(t[j]) > epsilon for j in range(n)] for t in taus]
    counts = [sum(1 for a in active if a[j]) for j in range(n)]
    boosts = []
    for a in active:
        shared = sum(1 for j in range(n) if a[j] and counts[j] > 1)
        unique = sum(1 for j in range(n) if a[j] and counts[j] == 1)
        rho = shared / max(unique, epsilon)
        boosts.append(1 + r * min(max(rho, 0.0), alpha) if plus else 1.0)
    out = []
    for j in range(n):
        total = base[j]
        for t, a, boost in zip(taus, active, boosts, strict=True):
            if not a[j]:
                continue
            total += t[j] * boost if counts[j] == 1 else t[j] / counts[j]
        out.append(total)
    return out
