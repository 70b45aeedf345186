"""The one metrics function shared by baselines and model evaluation."""

from __future__ import annotations

import numpy as np

HIT_KS = (1, 5, 10, 20)
NDCG_KS = (5, 10)
METRIC_KEYS = ("n", "hit@1", "hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "mrr", "mean_distance_m")


def ranking_metrics(
    ranks: np.ndarray, distances_m: np.ndarray | None = None
) -> dict[str, float | int | None]:
    """Metrics from 1-based ranks of the true location.

    Args:
        ranks: [N] int, 1 = the true location was ranked first (full rank over all candidate locations).
        distances_m: [N] float distance error in metres (top-1 or predicted point to the true location), or
            None when the data has no metric coordinates.
    Returns:
        {n, hit@1, hit@5, hit@10, hit@20, ndcg@5, ndcg@10, mrr, mean_distance_m};
        hit@k = share with rank <= k,
        ndcg@k = mean of 1/log2(rank+1) for rank <= k (one relevant item), mrr = mean 1/rank,
        mean_distance_m None without distances. All None but n when N = 0.
    """
    ranks = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if np.any(ranks < 1) or np.any(~np.isfinite(ranks)):
        raise ValueError("ranks must be finite and 1-based (>= 1)")
    n = len(ranks)
    out: dict[str, float | int | None] = {"n": n}
    if n == 0:
        out.update({k: None for k in METRIC_KEYS[1:]})
        return out
    for k in HIT_KS:
        out[f"hit@{k}"] = float(np.mean(ranks <= k))
    gain = 1.0 / np.log2(ranks + 1.0)
    for k in NDCG_KS:
        out[f"ndcg@{k}"] = float(np.mean(np.where(ranks <= k, gain, 0.0)))
    out["mrr"] = float(np.mean(1.0 / ranks))
    out["mean_distance_m"] = None
    if distances_m is not None:
        d = np.asarray(distances_m, dtype=np.float64).reshape(-1)
        if len(d) != n:
            raise ValueError(f"distances ({len(d)}) and ranks ({n}) differ in length")
        out["mean_distance_m"] = float(np.mean(d))
    return out
