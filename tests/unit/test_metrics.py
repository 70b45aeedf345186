"""ranking_metrics on hand-computed cases; exact rankers against brute force (ties by lower id)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nextlocmoe.eval.metrics import METRIC_KEYS, ranking_metrics
from nextlocmoe.eval.ranking import rank_by_keys, rank_by_point, rank_by_scores, top1_by_keys, topk_by_scores


def test_metrics_hand_computed() -> None:
    m = ranking_metrics(np.array([1, 2, 6, 30]), np.array([0.0, 100.0, 200.0, 300.0]))
    assert tuple(m) == METRIC_KEYS
    assert (
        m["n"] == 4
        and m["hit@1"] == 0.25
        and m["hit@5"] == 0.5
        and m["hit@10"] == 0.75
        and m["hit@20"] == 0.75
    )
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(7)) / 4)
    assert m["mrr"] == pytest.approx((1 + 0.5 + 1 / 6 + 1 / 30) / 4)
    assert m["mean_distance_m"] == 150.0


def test_metrics_no_distance_and_empty() -> None:
    assert ranking_metrics(np.array([1]))["mean_distance_m"] is None
    empty = ranking_metrics(np.array([], dtype=int))
    assert empty["n"] == 0 and empty["hit@1"] is None
    with pytest.raises(ValueError):
        ranking_metrics(np.array([0]))


def _brute_rank(pred: np.ndarray, locs: np.ndarray, target: np.ndarray) -> np.ndarray:
    out = []
    for p, t in zip(pred, target, strict=True):
        d = ((locs - p) ** 2).sum(axis=1)
        order = sorted(range(len(locs)), key=lambda j: (d[j], j))
        out.append(order.index(t) + 1)
    return np.array(out)


def test_rank_by_point_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    locs = rng.uniform(0, 1000, size=(60, 2)).round(0)
    locs[10] = locs[3]  # exact ties
    locs[11] = locs[3]
    pred = np.vstack([rng.uniform(0, 1000, size=(40, 2)), locs[[3, 10, 11]]])
    target = np.r_[rng.integers(0, 60, size=40), [11, 3, 10]]
    ranks, top = rank_by_point(pred, locs, target, topk=20)
    assert ranks.tolist() == _brute_rank(pred, locs, target).tolist()
    assert ranks[-3:].tolist() == [3, 1, 2]  # ties by lower id
    for i in range(len(pred)):
        d = ((locs - pred[i]) ** 2).sum(axis=1)
        assert top[i].tolist() == sorted(range(60), key=lambda j: (d[j], j))[:20]
        assert (ranks[i] <= 20) == (target[i] in top[i])
    chunked, _ = rank_by_point(pred, locs, target, topk=5)
    assert chunked.tolist() == ranks.tolist()


def test_rank_by_scores_ties_by_id() -> None:
    scores = np.array([[0.1, 0.5, 0.5, 0.2], [1.0, 1.0, 1.0, 1.0]])
    assert rank_by_scores(scores, np.array([2, 3])).tolist() == [2, 4]
    assert rank_by_scores(scores, np.array([1, 0])).tolist() == [1, 1]
    assert topk_by_scores(scores, 3).tolist() == [[1, 2, 3], [0, 1, 2]]


def test_rank_by_keys_lexicographic() -> None:
    a = np.array([[2.0, 2.0, 1.0, 0.0]])
    b = np.array([[0.0, 5.0, 9.0, 9.0]])
    # order: id1 (2,5), id0 (2,0), id2 (1,9), id3 (0,9)
    assert [rank_by_keys([a, b], np.array([t]))[0] for t in range(4)] == [2, 1, 3, 4]
    assert top1_by_keys([a, b]).tolist() == [1]
    assert top1_by_keys([np.zeros((1, 3))]).tolist() == [0]
