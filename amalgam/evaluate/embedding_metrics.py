"""Scores of sentence embeddings: nearest-centroid classification, retrieval (nDCG@k,
recall@k) and STS (Spearman of cosine similarity), on numpy arrays.

Definitions (MTEB's, Muennighoff et al., arXiv 2210.07316):

- cosine similarity of L2-normalized embeddings;
- classification: each test text takes the label of the nearest class centroid (the mean of
  the normalized training embeddings of that label), by cosine;
- nDCG@k = DCG@k / IDCG@k with DCG@k = sum_{r=1..k} grade_r / log2(r + 1) over the corpus
  ranked by cosine to the query, IDCG@k the DCG of the grades sorted best first (Jarvelin and
  Kekalainen 2002); recall@k = relevant documents in the top k / relevant documents;
- STS: Spearman's rank correlation of cosine similarities with the gold scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The (len(a), len(b)) matrix of cosine similarities."""
    return normalize(a) @ normalize(b).T


def nearest_centroid(train: np.ndarray, train_labels: Sequence[str], test: np.ndarray) -> list[str]:
    """Each test row's predicted label: the class whose centroid is most cosine-similar."""
    classes = sorted(set(train_labels))
    labels = np.asarray(train_labels)
    unit = normalize(train)
    centroids = np.stack([unit[labels == c].mean(axis=0) for c in classes])
    return [classes[i] for i in cosine(test, centroids).argmax(axis=1)]


def ranking(scores: np.ndarray) -> np.ndarray:
    """Per query row, document indices from best to worst (ties: lower index first)."""
    return np.argsort(-scores, axis=1, kind="stable")


def ndcg_at_k(ranked: Sequence[int], grades: Mapping[int, float], k: int) -> float:
    """nDCG@k of one query's ranked document indices, given its relevance grades."""
    gains = [grades.get(int(d), 0.0) for d in ranked[:k]]
    ideal = sorted(grades.values(), reverse=True)[:k]
    idcg = sum(g / np.log2(r + 2) for r, g in enumerate(ideal))
    return float(sum(g / np.log2(r + 2) for r, g in enumerate(gains)) / idcg) if idcg else 0.0


def recall_at_k(ranked: Sequence[int], grades: Mapping[int, float], k: int) -> float:
    """Share of one query's relevant documents (grade > 0) among its top ``k``."""
    relevant = {d for d, g in grades.items() if g > 0}
    return len(relevant & {int(d) for d in ranked[:k]}) / len(relevant) if relevant else 0.0


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties take their mean rank); NaN when either side is
    constant."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    # lazy: scipy takes a second to import
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)
