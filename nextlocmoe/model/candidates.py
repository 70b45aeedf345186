"""Candidate retrieval, then scoring (issue 20, docs/SCALE.md): the pointer head scores a per-sample set of
C << L places instead of every known place, so a step, an evaluation batch and a request cost the same at
L = 1M places as at L = 10k.

The candidate set of a sample (static width C = P + Kn + Kt + Np, duplicates and padding masked):

- the P places of its pointer window (every repeat target is among them, by definition);
- the Kn places nearest to the current place (a k-d tree over the location table, built once);
- the Kt most frequent train-split successors of the current place;
- the Np most visited places of the train split (the city's popular ones);
- in training only: the sample's own target (sampled softmax: the retrieved places are its negatives)
  and the targets of the other samples of the micro-batch (in-batch negatives).

The tables are derived from the data set when the model is built (non-persistent buffers: a checkpoint
does not carry them and a model rebuilt on another city's data gets that city's tables). ``dedupe`` keeps
the first occurrence of each place, so the pointer's copy mass sums onto one entry per place and every
place is counted once by the softmax. All shapes are static and every step is a gather or an [B, C, C]
comparison, so the exported graph does retrieval + scoring with no data-dependent shape.

Shape legend: B batch, P pointer slots, L known places, Kn near places, Kt successors, Np popular places,
C candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nextlocmoe.model.novelty import visits_and_successors


@dataclass
class RetrievalTables:
    """Per-place retrieval tables (numpy); ids are int32 with -1 padding."""

    near_LK: np.ndarray  # [L, Kn] nearest places of each place (itself first)
    succ_LK: np.ndarray  # [L, Kt] most frequent train-split successors (-1: fewer than Kt)
    succ_cnt_LK: np.ndarray  # [L, Kt] their transition counts (float32, 0 on padding)
    visits_L: np.ndarray  # [L] train-split visits per place (float32)
    popular_N: np.ndarray  # [Np] the most visited places, most visited first


def near_table(loc_xy_L2: np.ndarray, k: int) -> np.ndarray:
    """[L, k] int32: each place's k nearest places by Euclidean distance (itself first; -1 past L)."""
    from scipy.spatial import cKDTree

    xy = np.nan_to_num(np.asarray(loc_xy_L2, dtype=np.float64))
    n = len(xy)
    kk = min(k, n)
    _, ids = cKDTree(xy).query(xy, k=kk, workers=-1)
    ids = np.asarray(ids, dtype=np.int64).reshape(n, kk)
    out = np.full((n, k), -1, np.int32)
    out[:, :kk] = ids
    return out


def retrieval_tables(
    loc_xy_L2: np.ndarray, records: dict | None, k_near: int, k_succ: int, n_popular: int
) -> RetrievalTables:
    """Tables from the location table [L, 2] and the record columns (loc, user, split) of the prepared
    data set; counts over the TRAIN split only (``novelty.visits_and_successors``). ``records=None``
    (shape-only builds): no successors, no popularity."""
    n_loc = len(loc_xy_L2)
    near = near_table(loc_xy_L2, k_near)
    if records is None:
        z = np.zeros
        return RetrievalTables(near, np.full((n_loc, k_succ), -1, np.int32), z((n_loc, k_succ), np.float32),
                               z(n_loc, np.float32), np.arange(min(n_popular, n_loc)))  # fmt: skip
    visits_L, succ_ids_LK, succ_cnt_LK = visits_and_successors(records, n_loc, k_succ)
    succ = np.where(succ_cnt_LK > 0, succ_ids_LK, -1).astype(np.int32)
    popular = np.argsort(-visits_L, kind="stable")[:n_popular]
    return RetrievalTables(near, succ, succ_cnt_LK.astype(np.float32), visits_L, popular)


NO_PLACE = 1 << 40  # sort key of padding: after every place id


def dedupe(
    ids_BC: torch.Tensor, w_BC: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keep the first occurrence of each place: later duplicates become -1 (padding stays -1), and ``w``
    (e.g. the pointer's slot weights) is summed onto the kept entry. -> (ids [B, C], w [B, C] or None).

    One sort of the keys id * C + position (unique, so the earliest occurrence of a place comes first in
    its run), runs of equal ids marked, summed with a scatter-add and put back: O(C log C) per sample with
    static shapes (an [B, C, C] comparison costs more than scoring every place of a 5k-place city)."""
    B, C = ids_BC.shape
    pos_C = torch.arange(C, device=ids_BC.device)
    ids64 = ids_BC.long()
    key_BC = torch.where(ids64 >= 0, ids64, torch.full_like(ids64, NO_PLACE)) * C + pos_C
    key_s, order_BC = torch.sort(key_BC, dim=1)
    id_s = torch.div(key_s, C, rounding_mode="floor")
    new_run = torch.cat([torch.ones_like(id_s[:, :1], dtype=torch.bool), id_s[:, 1:] != id_s[:, :-1]], 1)
    first_s = new_run & (id_s != NO_PLACE)
    keep_BC = torch.zeros_like(first_s).scatter(1, order_BC, first_s)
    ids_out = torch.where(keep_BC, ids64, torch.full_like(ids64, -1))
    if w_BC is None:
        return ids_out, None
    run_BC = torch.cumsum(new_run.long(), 1) - 1
    w_s = w_BC.float().gather(1, order_BC)
    total_s = torch.zeros_like(w_s).scatter_add(1, run_BC, w_s).gather(1, run_BC) * first_s.float()
    return ids_out, torch.zeros_like(w_s).scatter(1, order_BC, total_s)


class CandidateIndex(nn.Module):
    """Retrieval of each sample's candidate places (module docstring) from per-place tables."""

    def __init__(self, tables: RetrievalTables, in_batch: bool = True) -> None:
        super().__init__()
        self.in_batch = bool(in_batch)
        # non-persistent: derived from the data set at build time, not part of a checkpoint
        self.register_buffer("near_LK", torch.as_tensor(tables.near_LK, dtype=torch.int32), persistent=False)
        self.register_buffer("succ_LK", torch.as_tensor(tables.succ_LK, dtype=torch.int32), persistent=False)
        cnt = torch.as_tensor(tables.succ_cnt_LK, dtype=torch.float32)
        self.register_buffer("succ_cnt_LK", cnt, persistent=False)
        self.register_buffer(
            "visits_L", torch.as_tensor(tables.visits_L, dtype=torch.float32), persistent=False
        )
        pop = torch.as_tensor(np.asarray(tables.popular_N, dtype=np.int64))
        self.register_buffer("popular_N", pop, persistent=False)

    @property
    def width(self) -> int:
        """Retrieved candidates per sample besides the pointer window (Kn + Kt + Np)."""
        return int(self.near_LK.shape[1] + self.succ_LK.shape[1] + self.popular_N.shape[0])

    def retrieve(self, batch: dict[str, torch.Tensor], target_B: torch.Tensor | None = None) -> torch.Tensor:
        """Candidate ids [B, C] before ``dedupe``: pointer window, near, successors, popular (+ the
        target and the batch's targets when ``target_B`` is given: training only)."""
        ptr_BP = batch["ptr_loc"].long()
        B = ptr_BP.shape[0]
        cur_B = batch["cur_loc"][:, -1].long()
        near_BK = self.rows_of(self.near_LK, cur_B).long()
        succ_BK = self.rows_of(self.succ_LK, cur_B).long()
        parts = [ptr_BP, near_BK, succ_BK, self.popular_N.unsqueeze(0).expand(B, -1)]
        if target_B is not None:
            parts.append(target_B.long().unsqueeze(1))
            if self.in_batch:
                parts.append(target_B.long().unsqueeze(0).expand(B, -1))
        return torch.cat(parts, 1)

    @staticmethod
    def rows_of(table_LK: torch.Tensor, cur_B: torch.Tensor) -> torch.Tensor:
        """The current places' rows [B, K] of a per-place table; an unknown current place (-1) gets a
        row of -1 (id tables: no candidates) -- its counts are then 0 through the -1 ids."""
        known_B1 = (cur_B >= 0).unsqueeze(1)
        return torch.where(known_B1, table_LK[cur_B.clamp_min(0)], torch.full_like(table_LK[:1], -1))

    def transitions(self, cand_BC: torch.Tensor, cur_B: torch.Tensor) -> torch.Tensor:
        """[B, C] train-split transition counts current place -> candidate (0 outside the Kt kept, and for
        an unknown current place)."""
        succ_BK = self.rows_of(self.succ_LK, cur_B).long()
        cnt_BK = self.succ_cnt_LK[cur_B.clamp_min(0)]
        match_BCK = (cand_BC.unsqueeze(2) == succ_BK.unsqueeze(1)) & (succ_BK >= 0).unsqueeze(1)
        return (match_BCK.float() * cnt_BK.unsqueeze(1)).sum(-1)


def candidate_ranks(scores_BC: torch.Tensor, cand_BC: torch.Tensor, target_B: torch.Tensor, n_loc: int):
    """Exact 1-based rank of each target among its candidates (ties: lower place id first); a target
    outside its candidate set gets rank ``n_loc`` (the worst). -> (ranks [B], inside [B] bool)."""
    hit_BC = cand_BC == target_B.unsqueeze(1)
    inside_B = hit_BC.any(1)
    s_t = torch.where(hit_BC, scores_BC, torch.full_like(scores_BC, -torch.inf)).amax(1, keepdim=True)
    valid = cand_BC >= 0
    better = (scores_BC > s_t) | ((scores_BC == s_t) & (cand_BC < target_B.unsqueeze(1)))
    ranks = 1 + (better & valid).sum(1)
    return torch.where(inside_B, ranks, torch.full_like(ranks, n_loc)), inside_B
