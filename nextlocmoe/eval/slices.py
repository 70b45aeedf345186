"""Evaluation slices (issue 23): repeat vs novel targets and the user's history length, for the model and
every baseline on the same samples.

- ``novel``: the target is not among the ``NOVEL_WINDOW`` = 256 records of the user right before it (the
  pointer window, any split); ``repeat`` otherwise. A copy mechanism can only reach repeat targets.
- ``history<64`` / ``history64-255`` / ``history>=256``: how many records the user has before the target
  (any split), the cold-start axis.
Both are functions of the records before the target only (no target information beyond its own id, which
is what is being predicted), computed from the prepared store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nextlocmoe.data.layout import eval_subset
from nextlocmoe.eval.baselines import flat_ranges
from nextlocmoe.eval.metrics import ranking_metrics

NOVEL_WINDOW = 256
HISTORY_BINS = (("history<64", 0, 64), ("history64-255", 64, 256), ("history>=256", 256, None))


def sample_slices(data_dir: str | Path, split: str, max_samples: int = 0) -> dict[str, np.ndarray]:
    """Boolean masks [S] over the evaluated samples (``eval_subset``: the order of model and baselines)."""
    data_dir = Path(data_dir)
    samples = np.load(data_dir / f"samples_{split}.npy")
    r = samples[eval_subset(len(samples), max_samples)].astype(np.int64)
    loc = np.load(data_dir / "records" / "loc.npy").astype(np.int64)
    pos = np.load(data_dir / "records" / "pos.npy").astype(np.int64)
    before = pos[r]  # the user's records before the target
    lo = np.maximum(r - before, r - NOVEL_WINDOW)
    idx, own = flat_ranges(lo, r - lo)
    seen = np.bincount(own[loc[idx] == loc[r][own]], minlength=len(r)) > 0
    masks = {"repeat": seen, "novel": ~seen}
    for name, a, b in HISTORY_BINS:
        masks[name] = (before >= a) & (before < b if b is not None else True)
    return masks


def slice_report(
    masks: dict[str, np.ndarray], model_ranks: dict[str, np.ndarray], baseline_ranks: dict[str, np.ndarray]
) -> dict[str, dict]:
    """Per slice: n, share of the samples, hit@k / ndcg@k / mrr of every model ranking and every baseline
    (distances are in the overall report)."""
    total = max(len(next(iter(masks.values()))), 1)
    out = {}
    for name, m in masks.items():
        out[name] = {
            "n": int(m.sum()),
            "share": float(m.sum() / total),
            "model": {k: _rank_only(r[m]) for k, r in model_ranks.items()},
            "baselines": {k: _rank_only(r[m]) for k, r in baseline_ranks.items()},
        }
    return out


def _rank_only(ranks: np.ndarray) -> dict:
    m = ranking_metrics(ranks, None)
    m.pop("mean_distance_m", None)
    return m


def routing_slices(raw: dict, mask_NS: np.ndarray | None, masks: dict[str, np.ndarray]) -> dict[str, dict]:
    """``explain``'s slices: per slice, the mean persona mix (router probability over the pooled tokens
    ``mask_NS``, per personalized MoE layer) and the mean function mix (over the current records), and
    for repeat vs novel the Jensen-Shannon divergence (base 2) between the two slices' mean mixes: does
    either router treat a step to a new place differently? ``raw``: ``explain.collect_routing``'s arrays,
    in the order of ``sample_slices``."""
    from nextlocmoe.eval.explain import js_divergence, sample_mixes

    persona = [sample_mixes(p, mask_NS) for p in raw["per_probs"]] if mask_NS is not None else []
    func = raw["sem_probs"].mean(1) if raw.get("sem_probs") is not None else None
    out: dict[str, dict] = {}
    for name, m in masks.items():
        out[name] = {
            "n": int(m.sum()),
            "persona_mix": [mx[m].mean(0).tolist() if m.any() else None for mx in persona],
            "function_mix": func[m].mean(0).tolist() if func is not None and m.any() else None,
        }
    rep, nov = masks.get("repeat"), masks.get("novel")
    if rep is not None and nov is not None and rep.any() and nov.any():
        js = {"persona": [float(js_divergence(mx[rep].mean(0), mx[nov].mean(0))) for mx in persona]}
        js["function"] = (
            float(js_divergence(func[rep].mean(0), func[nov].mean(0))) if func is not None else None
        )
        out["repeat_vs_novel_js"] = js
    return out
