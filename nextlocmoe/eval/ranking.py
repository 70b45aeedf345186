"""Exact ranks of the true location among all known locations, by distance or by score.

Ties are broken by location id, consistently in both rankers and in the returned top-k lists: among equal
distances (equal scores) the lower id ranks first. So rank <= k exactly when the target is in the top-k list.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

CHUNK_ELEMS = 4_000_000  # N*L elements per vectorised chunk (~32 MB of float64)


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n,2] x [L,2] -> [n,L] squared Euclidean distances, computed the same way everywhere (exact ties)."""
    dx = a[:, None, 0] - b[None, :, 0]
    dy = a[:, None, 1] - b[None, :, 1]
    return dx * dx + dy * dy


def rank_by_point(
    pred_xy_m: np.ndarray, loc_xy_m: np.ndarray, target_loc: np.ndarray, topk: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Rank all L locations by distance to each predicted point.

    Args:
        pred_xy_m: [N,2] predicted points (metres). loc_xy_m: [L,2] location coordinates (finite).
        target_loc: [N] int true location ids (0..L-1). topk: length of the returned lists (<= L).
    Returns:
        ranks [N] int64, exact 1-based rank of the target (ties by id); top [N,topk] int64 nearest ids.
    """
    pred = np.asarray(pred_xy_m, dtype=np.float64)
    locs = np.asarray(loc_xy_m, dtype=np.float64)
    target = np.asarray(target_loc, dtype=np.int64)
    n, n_loc = len(pred), len(locs)
    k = min(topk, n_loc)
    ids = np.arange(n_loc)
    ranks = np.empty(n, dtype=np.int64)
    step = max(1, CHUNK_ELEMS // max(n_loc, 1))
    for a in range(0, n, step):
        d = _sq_dist(pred[a : a + step], locs)
        t = target[a : a + step]
        dt = d[np.arange(len(t)), t][:, None]
        ranks[a : a + step] = 1 + ((d < dt) | ((d == dt) & (ids[None, :] < t[:, None]))).sum(axis=1)
    top = np.empty((n, k), dtype=np.int64)
    if n and k:
        extra = min(n_loc, k + 16)  # margin so equal distances at the cut are re-ordered by id
        _, cand = cKDTree(locs).query(pred, k=extra)
        cand = np.asarray(cand).reshape(n, extra)
        dc = _sq_dist_rows(pred, locs, cand)
        order = np.lexsort((cand, dc), axis=1)
        top = np.take_along_axis(cand, order, axis=1)[:, :k]
    return ranks, top


def _sq_dist_rows(pred: np.ndarray, locs: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """[N,2], [L,2], [N,K] -> [N,K] squared distances with the same arithmetic as `_sq_dist`."""
    dx = pred[:, None, 0] - locs[cand, 0]
    dy = pred[:, None, 1] - locs[cand, 1]
    return dx * dx + dy * dy


def rank_by_scores(scores: np.ndarray, target_loc: np.ndarray) -> np.ndarray:
    """Exact 1-based rank of the target under descending scores [N,L] (ties by id: lower id first) -> [N]."""
    scores = np.asarray(scores)
    target = np.asarray(target_loc, dtype=np.int64)
    st = scores[np.arange(len(target)), target][:, None]
    ids = np.arange(scores.shape[1])[None, :]
    return 1 + ((scores > st) | ((scores == st) & (ids < target[:, None]))).sum(axis=1).astype(np.int64)


def topk_by_scores(scores: np.ndarray, k: int) -> np.ndarray:
    """[N,L] scores -> [N,k] ids by descending score, ties by lower id."""
    k = min(k, scores.shape[1])
    ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((ids, -scores), axis=1)
    return order[:, :k]


def rank_by_keys(keys: list[np.ndarray], target_loc: np.ndarray) -> np.ndarray:
    """Exact 1-based rank under lexicographic descending keys (first key decides, later keys break its ties,
    then lower id). keys: list of [N,L] arrays. Returns [N] int64."""
    target = np.asarray(target_loc, dtype=np.int64)
    rows = np.arange(len(target))
    ids = np.arange(keys[0].shape[1])[None, :]
    better = np.zeros(keys[0].shape, dtype=bool)
    tied = np.ones(keys[0].shape, dtype=bool)
    for key in keys:
        kt = key[rows, target][:, None]
        better |= tied & (key > kt)
        tied &= key == kt
    better |= tied & (ids < target[:, None])
    return 1 + better.sum(axis=1).astype(np.int64)


def top1_by_keys(keys: list[np.ndarray]) -> np.ndarray:
    """[N] id ranked first under lexicographic descending keys (ties -> lower id); consistent with
    rank_by_keys."""
    mask = np.ones(keys[0].shape, dtype=bool)
    for key in keys:
        k = np.where(mask, key.astype(np.float64), -np.inf)
        mask &= k == k.max(axis=1, keepdims=True)
    return np.argmax(mask, axis=1).astype(np.int64)
