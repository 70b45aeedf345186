"""Cross-domain (zero-shot) evaluation: a run trained on one prepared data set, evaluated on another
(docs/EXPLAIN.md "Zero-shot").

- Candidates are the TARGET's location table only: the point ranking ranks the target's locations by
  distance to the predicted point; the scored head is re-targeted by ``load_run`` (target table, the
  source city's per-location embedding term dropped, distance + visit-count terms kept).
- ``normalise="target"`` (default): inputs normalised, predictions de-normalised with the target's
  stats.json (the model sees the target city centred and scaled as its training city was);
  ``"source"``: with the training data set's stats.json (absolute coordinates as in training; needs the
  run's ``data.dir``).
- Same metric keys as ``evaluate``, the target's baselines on the same samples, and a ``zero_shot`` block
  saying which ranking was used and how.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nextlocmoe.data.store import (
    TrajectoryDataset,
    collate,
    denormalise_xy,
    eval_subset,
    load_locations,
    load_manifest,
    load_stats,
)
from nextlocmoe.eval.baselines import baseline_report
from nextlocmoe.eval.evaluate import evaluate_model, score_ranks
from nextlocmoe.eval.metrics import ranking_metrics
from nextlocmoe.eval.ranking import rank_by_point
from nextlocmoe.geo import haversine_m, mercator_to_latlon

SCORED_TRANSFER = "scored head without its per-location embedding term: distance to the predicted point + "
SCORED_TRANSFER += "visit counts in the sample's own history / current window (learned beta, a_hist, a_cur)"


def _same_source(a: dict, b: dict) -> bool:
    return a.get("dataset") == b.get("dataset") and a.get("source_sha256") == b.get("source_sha256")


@torch.no_grad()
def _predict(model: torch.nn.Module, data_dir: Path, split: str, batch_size: int, max_samples: int,
             stats: dict) -> dict[str, np.ndarray]:  # fmt: skip
    """``evaluate.predict_split`` with the inputs normalised by ``stats`` (the same samples)."""
    ds = TrajectoryDataset(data_dir, split)
    ds.stats = stats
    idx = eval_subset(len(ds), max_samples)
    out: dict[str, list] = {"pred_xy": [], "target_loc": [], "scored_rank": [], "scored_top1": []}
    model.eval()
    for a in tqdm(range(0, len(idx), batch_size), desc=f"evaluate {split}", leave=False, mininterval=5):
        batch = collate(ds.get_batch(idx[a : a + batch_size]))
        pred, _ = model(batch)
        out["pred_xy"].append(pred.xy.float().numpy())
        out["target_loc"].append(batch["target_loc"].numpy())
        if pred.scores is not None:
            out["scored_rank"].append(score_ranks(pred.scores, batch["target_loc"]).numpy())
            out["scored_top1"].append(pred.scores.argmax(1).numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


def _metrics_with_stats(model: torch.nn.Module, data_dir: Path, split: str, batch_size: int,
                        max_samples: int, stats: dict) -> dict:  # fmt: skip
    """evaluate_model's rankings with an explicit normalisation (``--normalise source``)."""
    res = _predict(model, data_dir, split, batch_size, max_samples, stats)
    locs = load_locations(data_dir)
    pred_m = denormalise_xy(res["pred_xy"], stats)
    ranks, _ = rank_by_point(pred_m, locs["xy"], res["target_loc"])
    lat, lon = mercator_to_latlon(pred_m[:, 0], pred_m[:, 1])
    t = res["target_loc"]
    rankings = {"point": ranking_metrics(ranks, haversine_m(lat, lon, locs["lat"][t], locs["lon"][t]))}
    if "scored_rank" in res:
        top1 = res["scored_top1"]
        d = haversine_m(locs["lat"][top1], locs["lon"][top1], locs["lat"][t], locs["lon"][t])
        rankings["scored"] = ranking_metrics(res["scored_rank"], d)
    return rankings


def evaluate_transfer(
    run_dir: str | Path,
    data_dir: str | Path,
    split: str = "test",
    ranking: str | None = None,
    max_samples: int = 0,
    batch_size: int = 0,
    normalise: str = "target",
) -> dict:
    """``nextlocmoe evaluate --run RUN --data DIR [--normalise target|source]``: the CONTRACT.md report on
    DIR plus ``zero_shot`` {source, target, cross_domain, normalise, candidates, rankings: {name: how}}."""
    from nextlocmoe.model.io import load_run

    cfg, model, _ = load_run(run_dir, data_dir, normalise=normalise)
    data_dir = Path(data_dir)
    bs = batch_size or cfg.data.eval_batch_size
    ranking = ranking or cfg.model.heads.ranking
    target_m = load_manifest(data_dir)
    src_dir = Path(cfg.data.dir)
    src_m = load_manifest(src_dir) if (src_dir / "manifest.json").is_file() else {}
    transfer = getattr(model, "location_transfer", None)
    cross = bool(transfer) or (bool(src_m) and not _same_source(src_m, target_m))
    if normalise == "target":
        report = evaluate_model(model, data_dir, split, bs, ranking, max_samples)
    else:
        if not src_m:
            raise ValueError(f"--normalise source needs the run's training data at {src_dir} (stats.json)")
        rankings = _metrics_with_stats(model, data_dir, split, bs, max_samples, load_stats(src_dir))
        if ranking not in rankings:
            raise ValueError(f"ranking {ranking!r} not available (model has: {sorted(rankings)})")
        report = {"split": split, **rankings[ranking], "ranking": ranking, "rankings": rankings,
                  "dataset": target_m.get("dataset"), "data": str(data_dir)}  # fmt: skip
        base = baseline_report(data_dir, split, progress=False, max_samples=max_samples)
        if base["n"] != report["n"]:
            raise RuntimeError(f"baselines saw {base['n']} samples, the model {report['n']}")
        report["baselines"] = base["baselines"]
    how = {"point": "target locations ranked by distance to the predicted point"}
    if model.scored is not None:
        how["scored"] = SCORED_TRANSFER if transfer else "full scored head (the run's own location table)"
    report["run"] = str(run_dir)
    report["zero_shot"] = {
        "source_dataset": src_m.get("dataset", cfg.data.dir),
        "source_data": str(cfg.data.dir),
        "target_dataset": target_m.get("dataset"),
        "cross_domain": cross,
        "normalise": normalise,
        "stats_from": str(src_dir if normalise == "source" else data_dir),
        "candidates": f"target location table only ({int(target_m['locations'])} locations)",
        "headline_ranking": report["ranking"],
        "rankings": how,
    }
    return report
