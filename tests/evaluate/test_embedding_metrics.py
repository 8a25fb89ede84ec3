"""Embedding scores against hand-worked cases and naive loop formulations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from amalgam.evaluate import embedding_metrics as em
from tests.evaluate import naive_embedding as naive


def test_ndcg_hand_worked() -> None:
    # ranked docs 2, 0, 1; doc 0 has grade 1, doc 1 grade 2:
    # DCG@3 = 0/log2(2) + 1/log2(3) + 2/log2(4); IDCG@3 = 2/log2(2) + 1/log2(3)
    dcg = 1 / math.log2(3) + 2 / 2
    idcg = 2 + 1 / math.log2(3)
    assert em.ndcg_at_k([2, 0, 1], {0: 1.0, 1: 2.0}, 3) == pytest.approx(dcg / idcg)
    # @1: the top document is irrelevant
    assert em.ndcg_at_k([2, 0, 1], {0: 1.0, 1: 2.0}, 1) == 0.0
    # a perfect ranking scores 1
    assert em.ndcg_at_k([1, 0, 2], {0: 1.0, 1: 2.0}, 3) == pytest.approx(1.0)


def test_recall_hand_worked() -> None:
    assert em.recall_at_k([3, 1, 0, 2], {0: 1.0, 2: 1.0}, 1) == 0.0
    assert em.recall_at_k([3, 1, 0, 2], {0: 1.0, 2: 1.0}, 3) == 0.5
    assert em.recall_at_k([3, 1, 0, 2], {0: 1.0, 2: 1.0}, 4) == 1.0


def test_cosine_and_ranking_match_loops() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(7, 6))
    got = em.cosine(a, b)
    for i in range(4):
        for j in range(7):
            want = float(a[i] @ b[j]) / (np.linalg.norm(a[i]) * np.linalg.norm(b[j]))
            assert got[i, j] == pytest.approx(want)
        assert list(em.ranking(got)[i]) == sorted(range(7), key=lambda j: -got[i, j])


def test_spearman_matches_ranks_formula_with_ties() -> None:
    x = [0.3, 0.1, 0.1, 0.9, 0.5, 0.7, 0.2]
    y = [1.0, 2.0, 0.0, 5.0, 3.0, 3.0, 1.0]
    assert em.spearman(x, y) == pytest.approx(naive.spearman(x, y))


def test_nearest_centroid_matches_loop() -> None:
    rng = np.random.default_rng(1)
    labels = ["a", "b", "c"]
    centers = rng.normal(size=(3, 5))
    train_labels = [labels[i % 3] for i in range(30)]
    train = np.stack([centers[i % 3] + rng.normal(scale=1.5, size=5) for i in range(30)])
    test = rng.normal(size=(20, 5))
    expected = naive.nearest_centroid(train, train_labels, test)
    got = em.nearest_centroid(train, train_labels, test)
    assert got == expected
    assert len(set(got)) > 1  # the case separates the classes, not one constant answer
