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

from nextlocmoe.data.store import (
    load_manifest,
    load_stats,
)
from nextlocmoe.eval.evaluate import evaluate_model

SCORED_TRANSFER = "scored head without its per-location embedding term: distance to the predicted point + "
SCORED_TRANSFER += "visit counts in the sample's own history / current window (learned beta, a_hist, a_cur)"
RETRIEVAL_TRANSFER = "retrieval head (no per-location parameters): candidates and the generator's visit and "
RETRIEVAL_TRANSFER += "transition counts from the target data set's train split"
POINTER_TRANSFER = "copy/explore head without the source city's per-location embedding term and bias: "
POINTER_TRANSFER += (
    "the id-free pointer over the sample's own earlier records + distance terms of the generator"
)


def _same_source(a: dict, b: dict) -> bool:
    return a.get("dataset") == b.get("dataset") and a.get("source_sha256") == b.get("source_sha256")


def evaluate_transfer(
    run_dir: str | Path,
    data_dir: str | Path,
    split: str = "test",
    ranking: str | None = None,
    max_samples: int = 0,
    batch_size: int = 0,
    normalise: str = "target",
    fallback: bool = False,
) -> dict:
    """``nextlocmoe evaluate --run RUN --data DIR [--normalise target|source]``: the CONTRACT.md report on
    DIR plus ``zero_shot`` {source, target, cross_domain, normalise, candidates, rankings: {name: how}}."""
    from nextlocmoe.model.io import load_run

    cfg, model, _ = load_run(run_dir, data_dir, normalise=normalise, fallback=fallback)
    data_dir = Path(data_dir)
    bs = batch_size or cfg.data.eval_batch_size
    ranking = ranking or cfg.model.heads.ranking
    target_m = load_manifest(data_dir)
    src_dir = Path(cfg.data.dir)
    src_m = load_manifest(src_dir) if (src_dir / "manifest.json").is_file() else {}
    transfer = getattr(model, "location_transfer", None)
    cross = bool(transfer) or (bool(src_m) and not _same_source(src_m, target_m))
    stats = None
    if normalise == "source":
        if not src_m:
            raise ValueError(f"--normalise source needs the run's training data at {src_dir} (stats.json)")
        stats = load_stats(src_dir)
    report = evaluate_model(model, data_dir, split, bs, ranking, max_samples, stats=stats)
    how = {"point": "target locations ranked by distance to the predicted point"}
    if model.scored is not None:
        moved = POINTER_TRANSFER if hasattr(model.scored, "loc_bias") else SCORED_TRANSFER
        if getattr(model.scored, "index", None) is not None:
            moved = RETRIEVAL_TRANSFER
        how["scored"] = moved if transfer else "full scored head (the run's own location table)"
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
