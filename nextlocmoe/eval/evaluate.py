"""Model evaluation on one split, with the same metrics code and the same samples as the baselines.

Rankings (MODEL.md): ``point`` ranks every known location by distance to the predicted point (exact rank,
KD-tree top-k); ``scored`` ranks by the candidate-scoring head. Distance errors are great-circle metres:
the predicted Web-Mercator point is mapped back to WGS84 for ``point``; the top-1 location for ``scored``.
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
from nextlocmoe.eval.baselines import baseline_metrics, distance_errors, evaluate_baselines
from nextlocmoe.eval.metrics import ranking_metrics
from nextlocmoe.eval.ranking import rank_by_point
from nextlocmoe.eval.slices import sample_slices, slice_report
from nextlocmoe.geo import haversine_m, mercator_to_latlon
from nextlocmoe.model.candidates import candidate_ranks
from nextlocmoe.tokens.evaluation import codes_metrics, codes_predictions, task_batch

SCORE_BUDGET_ELEMS = 16_000_000  # batch x places per full-scoring tensor (64 MB of fp32)


def score_ranks(scores_BL: torch.Tensor, target_B: torch.Tensor) -> torch.Tensor:
    """Exact 1-based rank of each target by score (ties: lower location id first)."""
    s_t = scores_BL.gather(1, target_B.unsqueeze(1))
    ids = torch.arange(scores_BL.shape[1], device=scores_BL.device).unsqueeze(0)
    better = (scores_BL > s_t) | ((scores_BL == s_t) & (ids < target_B.unsqueeze(1)))
    return 1 + better.sum(1)


def batch_starts(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
    """First sample of each batch this rank evaluates: the single-process batches (same boundaries, same
    shapes, so the same numbers) split into ``world`` contiguous blocks, block ``rank`` here. Concatenating
    the ranks' outputs in rank order gives the single-process order."""
    starts = np.arange(0, n, batch_size)
    return [int(a) for a in np.array_split(starts, world)[rank]]


@torch.no_grad()
def predict_split(
    model: torch.nn.Module,
    data_dir: str | Path,
    split: str,
    batch_size: int,
    max_samples: int = 0,
    task: str = "next",
    stats: dict | None = None,
    device: torch.device | str = "cpu",
    shard: tuple[int, int] = (0, 1),
) -> dict[str, np.ndarray]:
    """Run the model over a split: pred_xy (normalised) [N,2], target_loc [N], scored / codes ranks and
    top-1 [N]. ``task="recovery"``: one record of each current window masked, it is the target (QTMOB.md).
    ``device``: where the model and batches live (the model is moved there). ``shard=(rank, world)``: this
    rank's block of the batches only (``batch_starts``; merged by ``eval/sharded.py``)."""
    ds = TrajectoryDataset(data_dir, split, pointer=getattr(model, "pointer_window", 0), stats=stats)
    idx = eval_subset(len(ds), max_samples)
    out: dict[str, list] = {"pred_xy": [], "target_loc": [], "scored_rank": [], "scored_top1": []}
    model.to(device).eval()
    n_loc = int(load_manifest(data_dir)["locations"])
    batch_size = memory_batch(model, batch_size, n_loc)
    starts = batch_starts(len(idx), batch_size, *shard)
    for a in tqdm(starts, desc=f"evaluate {split}", leave=False, mininterval=5, disable=shard[0] != 0):
        batch = task_batch(collate(ds.get_batch(idx[a : a + batch_size])), task)
        batch = {k: v.to(device) for k, v in batch.items()}
        pred, _ = model(batch)
        for k, v in codes_predictions(model, pred, batch["target_loc"]).items():
            out.setdefault(k, []).append(v)
        out["pred_xy"].append(pred.xy.float().cpu().numpy())
        out["target_loc"].append(batch["target_loc"].cpu().numpy())
        if pred.scores is not None:
            for k, v in scored_outputs(pred, batch["target_loc"], n_loc).items():
                out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items() if v}


def scored_outputs(pred, target_B: torch.Tensor, n_loc: int) -> dict[str, np.ndarray]:
    """Per-sample scored rank and top-1 place of one batch; with a retrieval head (``pred.cand``) ranks
    among the candidates (a target outside them ranks ``n_loc``) and ``candidate_inside`` (recall)."""
    if pred.cand is None:
        return {"scored_rank": score_ranks(pred.scores, target_B).cpu().numpy(),
                "scored_top1": pred.scores.argmax(1).cpu().numpy()}  # fmt: skip
    ranks, inside = candidate_ranks(pred.scores, pred.cand, target_B, n_loc)
    top1 = pred.cand.gather(1, pred.scores.argmax(1, keepdim=True)).squeeze(1)
    return {"scored_rank": ranks.cpu().numpy(), "scored_top1": top1.cpu().numpy(),
            "candidate_inside": inside.cpu().numpy()}  # fmt: skip


def memory_batch(model: torch.nn.Module, batch_size: int, n_loc: int) -> int:
    """``batch_size`` capped so a head that scores every place holds at most SCORE_BUDGET_ELEMS
    batch x place elements per [B, L] tensor (an evaluation batch that fits memory at any L)."""
    scored = getattr(model, "scored", None)
    if scored is None or getattr(scored, "index", None) is not None:  # no head / retrieval: no [B, L]
        return batch_size
    return max(1, min(batch_size, SCORE_BUDGET_ELEMS // max(n_loc, 1)))


def _point_metrics(res: dict, data_dir: str | Path, stats: dict | None = None) -> dict:
    """Metrics of the point ranking; its per-sample ranks are added to ``res`` as ``point_rank``."""
    stats, locs = stats or load_stats(data_dir), load_locations(data_dir)
    pred_m = denormalise_xy(res["pred_xy"], stats)
    ranks, _ = rank_by_point(pred_m, locs["xy"], res["target_loc"])
    res["point_rank"] = ranks
    t = res["target_loc"]
    if load_manifest(data_dir).get("coordinate_units", "degrees") == "normalised":  # not metres
        m = ranking_metrics(ranks, None)
        m["mean_distance_normalised"] = float(np.linalg.norm(pred_m - locs["xy"][t], axis=1).mean())
        return m
    lat, lon = mercator_to_latlon(pred_m[:, 0], pred_m[:, 1])
    return ranking_metrics(ranks, haversine_m(lat, lon, locs["lat"][t], locs["lon"][t]))


def _scored_metrics(res: dict, data_dir: str | Path) -> dict:
    dist, units = distance_errors(data_dir, res["scored_top1"], res["target_loc"])
    m = ranking_metrics(res["scored_rank"], dist if units == "metres" else None)
    if units == "normalised":  # source units of a store without WGS84 (DATA.md)
        m["mean_distance_normalised"] = float(dist.mean()) if len(dist) else None
    return m


def evaluate_model(
    model: torch.nn.Module,
    data_dir: str | Path,
    split: str = "test",
    batch_size: int = 256,
    ranking: str = "scored",
    max_samples: int = 0,
    with_baselines: bool = True,
    task: str = "next",
    stats: dict | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """CONTRACT.md evaluate report: headline metrics of ``ranking``, every ranking under ``rankings``,
    the baselines on the same samples under ``baselines`` (``task``: next | recovery, QTMOB.md).
    ``stats``: normalisation statistics other than the data set's own (zero-shot ``--normalise source``)."""
    check_evaluable(data_dir)
    res = predict_split(model, data_dir, split, batch_size, max_samples, task, stats, device)
    beam = model.qtmob.beam if getattr(model, "qtmob", None) is not None else 0
    return report_from_predictions(
        res, data_dir, split, ranking, max_samples, with_baselines, task, stats, beam
    )


def check_evaluable(data_dir: str | Path) -> None:
    if load_manifest(data_dir).get("coordinate_units", "degrees") not in ("degrees", "normalised"):
        raise ValueError(f"{data_dir}: model evaluation needs location coordinates")


def report_from_predictions(
    res: dict[str, np.ndarray],
    data_dir: str | Path,
    split: str = "test",
    ranking: str = "scored",
    max_samples: int = 0,
    with_baselines: bool = True,
    task: str = "next",
    stats: dict | None = None,
    beam: int = 0,
) -> dict:
    """Metrics of every ranking from ``predict_split``'s output (one process, or merged over ranks) and
    the baselines on the same samples."""
    manifest = load_manifest(data_dir)
    rankings = {"point": _point_metrics(res, data_dir, stats)}
    if "scored_rank" in res:
        rankings["scored"] = _scored_metrics(res, data_dir)
        if "candidate_inside" in res:  # retrieval head: share of targets inside the candidate set
            rankings["scored"]["candidate_recall"] = float(np.mean(res["candidate_inside"]))
    if "codes_rank" in res:
        rankings["codes"] = codes_metrics(res, data_dir, beam)
    if ranking not in rankings:
        raise ValueError(f"ranking {ranking!r} not available (model has: {sorted(rankings)})")
    report = {"split": split, **rankings[ranking], "ranking": ranking, "rankings": rankings,
              "dataset": manifest.get("dataset"), "data": str(data_dir)}  # fmt: skip
    if task == "recovery":
        from nextlocmoe.tokens.recovery import recovery_baselines

        report["task"] = task
        if with_baselines:
            report["baselines"] = recovery_baselines(data_dir, split, max_samples)
        return report
    if with_baselines:
        res_b, ref = evaluate_baselines(data_dir, split, progress=False, max_samples=max_samples)
        if not np.array_equal(ref["target"], res["target_loc"]):
            raise RuntimeError(
                f"baselines saw other samples ({len(ref['target'])}) than the model ({report['n']})"
            )
        report["baselines"] = baseline_metrics(res_b, ref, data_dir, split)["baselines"]
        model_ranks = {k.removesuffix("_rank"): v for k, v in res.items() if k.endswith("_rank")}
        base_ranks = {name: r["ranks"] for name, r in res_b.items()}
        report["slices"] = slice_report(sample_slices(data_dir, split, max_samples), model_ranks, base_ranks)
    return report


def evaluate_run(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    split: str = "test",
    ranking: str | None = None,
    max_samples: int = 0,
    batch_size: int = 0,
    task: str = "next",
) -> dict:
    """``nextlocmoe evaluate --run`` in one process on the CPU: load the run's newest complete checkpoint
    (any ep_size) into the single-device model and evaluate it on ``data_dir`` (default: the run's own
    data set). The accelerator / multi-rank form is ``eval/sharded.py``; this is its one-process case."""
    from nextlocmoe.eval.sharded import Placement, evaluate_run_sharded

    return evaluate_run_sharded(
        run_dir, Placement(), data_dir, split, ranking, max_samples, batch_size, task
    )  # fmt: skip
