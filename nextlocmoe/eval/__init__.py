"""Evaluation: shared metrics, exact rankers and non-learned baselines."""

from nextlocmoe.eval.metrics import METRIC_KEYS, ranking_metrics
from nextlocmoe.eval.ranking import rank_by_keys, rank_by_point, rank_by_scores, top1_by_keys, topk_by_scores

__all__ = [
    "METRIC_KEYS",
    "ranking_metrics",
    "rank_by_keys",
    "rank_by_point",
    "rank_by_scores",
    "top1_by_keys",
    "topk_by_scores",
]
