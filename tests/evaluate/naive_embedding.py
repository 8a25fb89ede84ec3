"""Loop formulations of the embedding scores, to check amalgam's vectorised ones against."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            out[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    vx = sum((a - mx) ** 2 for a in x)
    vy = sum((b - my) ** 2 for b in y)
    return cov / math.sqrt(vx * vy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(ranks(x), ranks(y))


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(sum(float(x) * float(y) for x, y in zip(a, b, strict=True))) / (
        math.sqrt(sum(float(x) ** 2 for x in a)) * math.sqrt(sum(float(y) ** 2 for y in b))
    )


def nearest_centroid(train: np.ndarray, labels: Sequence[str], test: np.ndarray) -> list[str]:
    """Per test row, the label whose mean of unit training rows is most cosine-similar."""
    out = []
    for t in test:
        best, best_sim = None, -2.0
        for c in sorted(set(labels)):
            rows = [r / np.linalg.norm(r) for r, lab in zip(train, labels, strict=True) if lab == c]
            sim = cos(t, sum(rows) / len(rows))
            if sim > best_sim:
                best, best_sim = c, sim
        out.append(best)
    return out


def ndcg_recall(
    query: np.ndarray, docs: np.ndarray, grades: dict[int, float], k: int
) -> tuple[float, float]:
    """(nDCG@k, recall@k) of one query by the textbook formulas."""
    sims = [cos(query, d) for d in docs]
    top = sorted(range(len(docs)), key=lambda j: (-sims[j], j))[:k]
    dcg = sum(grades.get(d, 0.0) / math.log2(r + 2) for r, d in enumerate(top))
    ideal = sorted(grades.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
    relevant = {d for d, g in grades.items() if g > 0}
    return dcg / idcg, len(relevant & set(top)) / len(relevant)
