"""Mobility recovery (QT-Mob): mask records inside the current window and predict the (first) masked
record's location (docs/QTMOB.md).

A masked record keeps its time (weekday, hour, duration: "where was the user at that time?") and loses its
location: ``cur_xy`` -> 0, ``cur_loc`` -> -1 (so its code ids and the scored head's visit counts are gone
too), ``cur_masked`` -> True (the model puts its learned mask embedding there). The target (target_xy,
target_loc, target_dur) becomes the first masked record's. The last current record is never masked, so every
masked record has context on both sides. The original next-location target is not an input either way.

Evaluation masks one record per sample at position ``eval_positions(sample_index)`` (a fixed hash, the same
for the model and the recovery baselines).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from nextlocmoe.data.layout import eval_subset, load_manifest
from nextlocmoe.eval.baselines import BaselineModel, _load_records, distance_errors
from nextlocmoe.eval.metrics import ranking_metrics
from nextlocmoe.eval.ranking import rank_by_keys, top1_by_keys

CHUNK_ELEMS = 2_000_000
BASELINES = ("markov", "user_frequency", "global_popularity")  # recovery versions of these three


def eval_positions(sample_index: np.ndarray | torch.Tensor, current: int) -> np.ndarray:
    """Masked position (0..C-2) per sample: a fixed multiplicative hash of the sample index."""
    idx = np.asarray(sample_index, dtype=np.uint64)
    return ((idx * np.uint64(2654435761)) >> np.uint64(7)) % np.uint64(max(current - 1, 1))


def train_positions(batch_size: int, current: int, n_masks: int, rng: np.random.Generator) -> np.ndarray:
    """[B, n_masks] distinct random positions in 0..C-2 (column 0 is the target)."""
    n = min(n_masks, current - 1)
    return np.argsort(rng.random((batch_size, current - 1)), axis=1)[:, :n]


def mask_batch(batch: dict[str, torch.Tensor], positions_BM: np.ndarray) -> dict[str, torch.Tensor]:
    """A recovery batch from a next-location batch: positions [B, M] (column 0 = the target)."""
    out = {k: v.clone() for k, v in batch.items()}
    pos = torch.as_tensor(np.asarray(positions_BM, dtype=np.int64)).reshape(len(positions_BM), -1)
    B, C = batch["cur_loc"].shape
    rows = torch.arange(B)
    t = pos[:, 0]
    out["target_xy"] = batch["cur_xy"][rows, t].clone()
    out["target_loc"] = batch["cur_loc"][rows, t].clone()
    out["target_dur"] = batch["cur_dur"][rows, t].clone()
    masked = torch.zeros(B, C, dtype=torch.bool)
    masked[rows.unsqueeze(1).expand_as(pos), pos] = True
    out["cur_masked"] = masked
    out["cur_xy"] = torch.where(masked.unsqueeze(-1), torch.zeros_like(batch["cur_xy"]), batch["cur_xy"])
    out["cur_loc"] = torch.where(masked, torch.full_like(batch["cur_loc"], -1), batch["cur_loc"])
    if "ptr_loc" in batch:  # the pointer window ends with the current window: hide the masked slots too
        P = batch["ptr_loc"].shape[1]
        m_BP = torch.cat([torch.zeros(B, P - C, dtype=torch.bool), masked], 1)
        out["ptr_loc"] = torch.where(m_BP, torch.full_like(batch["ptr_loc"], -1), batch["ptr_loc"])
        out["ptr_xy"] = torch.where(m_BP.unsqueeze(-1), torch.zeros_like(batch["ptr_xy"]), batch["ptr_xy"])
        out["query_weekday"] = batch["cur_weekday"][rows, t].clone()  # the masked record's time
        out["query_hour"] = batch["cur_hour"][rows, t].clone()
    return out


def mix_recovery(
    batch: dict[str, torch.Tensor], n_masks: int, next_weight: float, recovery_weight: float, seed: int
) -> dict[str, torch.Tensor]:
    """Training batch = [next-location samples ; recovery copies of them], with ``cur_masked`` and
    ``sample_weight`` (next_weight / B and recovery_weight / B: the loss sums weighted per-sample terms, i.e.
    next_weight * mean(next) + recovery_weight * mean(recovery))."""
    B, C = batch["cur_loc"].shape
    rec = mask_batch(batch, train_positions(B, C, n_masks, np.random.default_rng(seed)))
    nxt = dict(batch, cur_masked=torch.zeros(B, C, dtype=torch.bool))
    out = {k: torch.cat([nxt[k], rec[k]]) for k in rec}
    w = [torch.full((B,), next_weight / B), torch.full((B,), recovery_weight / B)]
    out["sample_weight"] = torch.cat(w)
    return out


# ----------------------------------------------------------------------------------------------------------
# Recovery baselines (same names as the next-location ones, adapted to a gap with context on both sides)


def recovery_baselines(data_dir: str | Path, split: str, max_samples: int = 0) -> dict:
    """{baseline: metrics} for recovering the masked record of each evaluated sample (``eval_positions``):
    - markov: train-split transitions, score = n(prev -> l) * n(l -> next), then n(prev -> l), then
      user_frequency, then popularity;
    - user_frequency: the user's train-split records before the masked one + the sample's other inputs;
    - global_popularity: train-split counts."""
    data_dir = Path(data_dir)
    man = load_manifest(data_dir)
    C, n_loc = int(man["current"]), int(man["locations"])
    samples = np.load(data_dir / f"samples_{split}.npy")
    idx = eval_subset(len(samples), max_samples)
    r = samples[idx].astype(np.int64)
    m = r - C + eval_positions(idx, C).astype(np.int64)  # masked record index
    rec = _load_records(data_dir)
    loc = rec["loc"].astype(np.int64)
    base = BaselineModel(rec, n_loc, int(man["history"]) + C)
    t_in = sp.csc_matrix(base.transitions)
    target = loc[m]
    res = {b: {"ranks": np.empty(len(m), np.int64), "top1": np.empty(len(m), np.int64)} for b in BASELINES}
    step = max(1, CHUNK_ELEMS // max(n_loc, 1))
    for a in range(0, len(m), step):
        mm, rr = m[a : a + step], r[a : a + step]
        user = base.user_counts(mm)
        for j in range(1, C):  # the current records after the masked one (inputs too)
            after = mm + j
            ok = after < rr
            np.add.at(user, (np.flatnonzero(ok), loc[after[ok]]), 1.0)
        fwd = base.transitions[loc[mm - 1]].toarray()
        bwd = t_in[:, loc[mm + 1]].T.toarray()
        pop = np.broadcast_to(base.popularity, user.shape)
        keys = {"markov": [fwd * bwd, fwd, user, pop], "user_frequency": [user, pop],
                "global_popularity": [pop]}  # fmt: skip
        for name, k in keys.items():
            res[name]["ranks"][a : a + step] = rank_by_keys(k, target[a : a + step])
            res[name]["top1"][a : a + step] = top1_by_keys(k)
    out = {}
    for name in BASELINES:
        dist, units = distance_errors(data_dir, res[name]["top1"], target)
        out[name] = ranking_metrics(res[name]["ranks"], dist if units == "metres" else None)
    return out
