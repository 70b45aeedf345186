"""Exploration: the explore part of the pointer head as a distribution over the places the user has NOT
visited in the pointer window (issue 23, docs/MODEL_QUALITY.md "Exploration").

With ``model.heads.novelty`` the scored head is p(l) = g p_copy(l) + (1 - g) p_new(l) where p_copy lives on
the window's places and p_new on every other place, so g is P(the target is a repeat) and copy mass can no
longer swamp the unvisited candidates; NLL on this mixture trains the gate on repeats and novel targets alike
and p_new on the novel targets only.

p_new(l) = softmax over unvisited l of s(l) + gen(l), where gen is the pointer head's generator (learned
location embedding and bias, distances) and s is this module's id-free candidate score

    s(l) = sum_h gelu(W f_l + Q h)_h (v_0 + sum_e pi_e v_e + sum_f omega_f u_f)_h
           + f_l . (a_0 + sum_e pi_e a_e + sum_f omega_f b_f)          (a_0 starts at a gravity score)

with the candidate features f_l (F = 8): log distance to the current place, to the nearest current-window
record, to the coordinate head's predicted point and to the centroid of the window; log visit count of l in
the train split, in the query's time bin (3-hour bin x weekday/weekend) and their difference (time fit);
log count of the train-split transition current place -> l (top ``novelty_transitions`` successors per
place). The persona routing weights pi and the function routing weights omega choose the scoring vector, as
in the copy slots: the routers decide where a person like this goes when it goes somewhere new.

With ``novelty_covisit`` = Kc > 0 two more features (F = 10): log train users of l and its co-visitation
with the window's places (``NoveltyScorer.covis_BL``: the Kc places sharing the most train users with l).

``cand_BC`` (every scoring method): score only a candidate set [B, C] of place ids (-1 padding, score NEG),
e.g. a retrieved set, with per-candidate gathers instead of [B, L] maps; None = every place.

Counts are over the whole train split (``city_counts``). On a training batch (module in training mode, the
target given) each count is leave-one-out: the sample's own target record (and its transition from the
current place) is subtracted and the sample's user is taken out of the target's co-visitation, so no
training score sees its own target; evaluation never reads the target.

Gate features added here (``gate_stats``, S = 4): the share of first visits among the window's last 64
records (how much this user explores), whether the last two input records were first visits, and the
log-sum-exp of the novelty scores.

Shape legend: B batch, L known locations, P pointer slots, C current records (or candidates, with
``cand_BC``), F candidate features, Hd hidden width, E persona experts, Es function experts, T time bins,
K kept successors (or co-visited places), S gate stats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nextlocmoe.model.precision import linear32, param32

N_CAND_FEATURES = 8
N_COVIS_FEATURES = 2  # with ``novelty_covisit``: users per place, co-visitation with the window
N_GATE_STATS = 4
N_TIME_BINS = 16  # 8 three-hour bins x (weekday, weekend)
RATE_WINDOW = 64  # last slots over which the user's first-visit share is measured
NEG = -1e4


@dataclass
class CityCounts:
    """Train-split counts of a prepared data set (numpy, built by ``city_counts``)."""

    visits_L: np.ndarray  # [L] records per place
    visits_LT: np.ndarray  # [L, T] records per place and time bin
    succ_ids_LK: np.ndarray  # [L, K] the K most frequent successors of each place (padding: id 0, count 0)
    succ_cnt_LK: np.ndarray  # [L, K] their transition counts
    # co-visitation (``novelty_covisit`` = Kc > 0, else None): the Kc places sharing the most train-split
    # users with each place, how many users they share, and each place's number of distinct train users
    covis_ids_LK: np.ndarray | None = None  # [L, Kc] (padding: id 0, count 0)
    covis_cnt_LK: np.ndarray | None = None  # [L, Kc]
    users_L: np.ndarray | None = None  # [L]


def time_bin(hour: torch.Tensor | np.ndarray, weekday: torch.Tensor | np.ndarray):
    """Time bin 0..15: three-hour bin of the day + 8 on Saturday/Sunday (weekday 5, 6)."""
    return hour // 3 + 8 * (weekday >= 5)


def _top_per_row(src: np.ndarray, dst: np.ndarray, cnt: np.ndarray, n_loc: int, k: int):
    """The ``k`` largest ``cnt`` of each source row, dense [n_loc, k] (ids, counts); padding id 0, count 0."""
    order = np.lexsort((dst, -cnt, src))  # by source, most frequent first (ties: smaller id)
    src, dst, cnt = src[order], dst[order], cnt[order]
    rank = np.arange(len(src)) - np.searchsorted(src, src, side="left")
    keep = rank < k
    ids = np.zeros((n_loc, k), np.int64)
    cnts = np.zeros((n_loc, k), np.float32)
    ids[src[keep], rank[keep]] = dst[keep]
    cnts[src[keep], rank[keep]] = cnt[keep]
    return ids, cnts


def covisitation(user: np.ndarray, loc: np.ndarray, n_loc: int, k: int) -> tuple[np.ndarray, ...]:
    """(ids [L, k], shared users [L, k], users per place [L]) from train records (user, loc): C = U^T U of
    the binary user x place matrix (scipy sparse: no [L, L] dense table), diagonal = users per place."""
    import scipy.sparse as sp

    n_user = int(user.max()) + 1 if len(user) else 1
    U = sp.csr_matrix((np.ones(len(loc), np.float32), (user, loc)), shape=(n_user, n_loc))
    U.data[:] = 1.0  # duplicates summed by the constructor: one user counts once per place
    C = (U.T @ U).tocoo()
    users_L = np.zeros(n_loc, np.float32)
    diag = C.row == C.col
    users_L[C.row[diag]] = C.data[diag]
    off = ~diag
    ids, cnts = _top_per_row(C.row[off].astype(np.int64), C.col[off].astype(np.int64), C.data[off], n_loc, k)
    return ids, cnts, users_L


def _train_view(records: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(loc as int64 [N], user [N], train mask [N]) of the record columns: one conversion per table build."""
    return records["loc"].astype(np.int64), records["user"], records["split"] == 0


def visits_and_successors(
    records: dict[str, np.ndarray], n_loc: int, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visit counts [L] and each place's ``top_k`` most frequent successors (ids, counts [L, K]; padding id
    0, count 0) over the TRAIN split (``split == 0``) of ``records`` (columns loc, user, split). A transition
    i -> i+1 counts when both records belong to the same user and record i+1 is a train record (as the
    ``markov`` baseline). Shared by ``city_counts`` and the retrieval head's tables, which need no more."""
    return _visits_and_successors(*_train_view(records), n_loc, top_k)


def _visits_and_successors(
    loc: np.ndarray, user: np.ndarray, train: np.ndarray, n_loc: int, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    visits_L = np.bincount(loc[train], minlength=n_loc).astype(np.float32)
    step = np.flatnonzero((user[1:] == user[:-1]) & train[1:])
    keys, cnt = np.unique(loc[step] * n_loc + loc[step + 1], return_counts=True)
    ids, cnts = _top_per_row(keys // n_loc, keys % n_loc, cnt, n_loc, top_k)
    return visits_L, ids, cnts


def city_counts(records: dict[str, np.ndarray], n_loc: int, top_k: int, covisit_k: int = 0) -> CityCounts:
    """Visit, time-bin and transition counts over the TRAIN split (``split == 0``) of ``records``
    (columns loc, user, hour, weekday, split; transitions as ``visits_and_successors``). ``covisit_k`` > 0
    adds the co-visitation lists (``covisitation``) of the train split."""
    loc, user, train = _train_view(records)
    visits_L, ids, cnts = _visits_and_successors(loc, user, train, n_loc, top_k)
    tb = time_bin(records["hour"].astype(np.int64), records["weekday"].astype(np.int64))
    visits_LT = np.zeros((n_loc, N_TIME_BINS), np.float32)
    np.add.at(visits_LT, (loc[train], tb[train]), 1.0)
    out = CityCounts(visits_L, visits_LT, ids, cnts)
    if covisit_k > 0:
        uid = np.asarray(user)[train].astype(np.int64)
        out.covis_ids_LK, out.covis_cnt_LK, out.users_L = covisitation(uid, loc[train], n_loc, covisit_k)
    return out


def _log_dist(xy_B2: torch.Tensor, xy: torch.Tensor, metres_per_unit: float) -> torch.Tensor:
    """log(1 + metres / 100) / 5 between points [B, 2] and places: [L, 2] (every place) or [B, C, 2] (each
    row's candidates) -> [B, L] or [B, C]."""
    diff = xy_B2.float().unsqueeze(1) - (xy.unsqueeze(0) if xy.dim() == 2 else xy)
    d = torch.sqrt((diff * diff).sum(-1) + 1e-12) * metres_per_unit
    return torch.log1p(d / 100.0) / 5.0


def _per_row(table_L: torch.Tensor, cand_BC: torch.Tensor | None, B: int) -> torch.Tensor:
    """A per-place table [L, ...] at every place [B, L, ...] (cand None) or at the candidates [B, C, ...]."""
    if cand_BC is None:
        return table_L.unsqueeze(0).expand(B, *table_L.shape)
    return table_L[cand_BC.clamp_min(0)]


def visited_mask(ptr_loc_BP: torch.Tensor, n_loc: int) -> torch.Tensor:
    """[B, L] float: 1 where the place occurs among the valid pointer slots (scatter-add: exportable)."""
    valid = (ptr_loc_BP >= 0).float()
    hits = torch.zeros(ptr_loc_BP.shape[0], n_loc, dtype=torch.float32, device=ptr_loc_BP.device)
    return (hits.scatter_add(1, ptr_loc_BP.clamp_min(0), valid) > 0).float()


def visited_in(ptr_loc_BP: torch.Tensor, cand_BC: torch.Tensor) -> torch.Tensor:
    """[B, C] float: 1 where candidate c occurs among the valid pointer slots ([B, C, P] comparison: for a
    retrieved candidate set; ``visited_mask`` is the all-places form)."""
    hit = (cand_BC.unsqueeze(2) == ptr_loc_BP.unsqueeze(1)) & (ptr_loc_BP >= 0).unsqueeze(1)
    return (hit.any(-1) & (cand_BC >= 0)).float()


def first_visits(ptr_loc_BP: torch.Tensor) -> torch.Tensor:
    """[B, P] float: 1 where slot j is valid and its place occurs in no earlier valid slot."""
    P = ptr_loc_BP.shape[1]
    valid = ptr_loc_BP >= 0
    same = ptr_loc_BP.unsqueeze(2) == ptr_loc_BP.unsqueeze(1)  # [B, j, k]
    earlier = torch.ones(P, P, dtype=torch.bool, device=ptr_loc_BP.device).tril(-1)
    seen = (same & earlier.unsqueeze(0) & valid.unsqueeze(1)).any(-1)
    return (valid & ~seen).float()


class NoveltyScorer(nn.Module):
    """Id-free scores of unvisited candidates and the gate's exploration statistics (module docstring)."""

    def __init__(
        self,
        d_model: int,
        hidden: int,
        num_personas: int,
        num_functions: int,
        n_loc: int,
        metres_per_unit: float,
        query_time: bool,
        top_k: int,
        counts: CityCounts | None = None,
        covisit_k: int = 0,
    ) -> None:
        super().__init__()
        self.metres_per_unit, self.query_time = float(metres_per_unit), bool(query_time)
        self.covisit_k = int(covisit_k)  # 0: no co-visitation features
        self._register_counts(counts, n_loc, top_k)
        n_feat = N_CAND_FEATURES + (N_COVIS_FEATURES if self.covisit_k > 0 else 0)
        self.hidden = int(hidden)  # 0: the routed linear part only (no per-candidate MLP)
        if self.hidden > 0:
            self.cand_in = nn.Linear(n_feat, hidden)
            self.query_in = nn.Linear(d_model, hidden, bias=False)
            self.v0 = nn.Parameter(torch.zeros(hidden))
            self.v_persona = nn.Parameter(torch.zeros(num_personas, hidden))
            self.v_function = nn.Parameter(torch.zeros(max(num_functions, 1), hidden))
        # linear part, routed the same way: s += f . (a_0 + sum_e pi_e a_e + sum_f omega_f b_f)
        self.a0 = nn.Parameter(torch.zeros(n_feat))
        self.a_persona = nn.Parameter(torch.zeros(num_personas, n_feat))
        self.a_function = nn.Parameter(torch.zeros(max(num_functions, 1), n_feat))
        with torch.no_grad():  # start from gravity (explore_nearby's score + successors), not from zero
            self.a0[0], self.a0[4], self.a0[7] = -10.0, 5.0, 4.0
            if self.covisit_k > 0:  # + co-visitation with the window's places, at the probe's weight
                self.a0[N_CAND_FEATURES + 1] = 3.0

    def _register_counts(self, counts: CityCounts | None, n_loc: int, top_k: int) -> None:
        """The count tables as buffers (location-table entries: a zero-shot load replaces them)."""
        kc, z = self.covisit_k, np.zeros
        if counts is None:  # no data set at hand (tests, shape-only builds): zero counts, filled by loading
            counts = CityCounts(z(n_loc, np.float32), z((n_loc, N_TIME_BINS), np.float32),
                                z((n_loc, top_k), np.int64), z((n_loc, top_k), np.float32))  # fmt: skip
        got = (counts.visits_L.shape[0], counts.succ_ids_LK.shape[1])
        if got != (n_loc, top_k):
            raise ValueError(f"city counts for (places, successors) {got}, the model wants {(n_loc, top_k)}")
        self.register_buffer("visits_L", torch.as_tensor(counts.visits_L).float().clone())
        self.register_buffer("visits_LT", torch.as_tensor(counts.visits_LT).float().clone())
        self.register_buffer("succ_ids_LK", torch.as_tensor(counts.succ_ids_LK).long().clone())
        self.register_buffer("succ_cnt_LK", torch.as_tensor(counts.succ_cnt_LK).float().clone())
        if kc == 0:
            return
        ids, cnt, users = counts.covis_ids_LK, counts.covis_cnt_LK, counts.users_L
        if ids is None or cnt is None or users is None:
            ids, cnt, users = z((n_loc, kc), np.int64), z((n_loc, kc), np.float32), z(n_loc, np.float32)
        if ids.shape != (n_loc, kc):
            raise ValueError(f"co-visitation lists {ids.shape}, the model wants {(n_loc, kc)}")
        self.register_buffer("covis_ids_LK", torch.as_tensor(ids).long().clone())
        self.register_buffer("covis_cnt_LK", torch.as_tensor(cnt).float().clone())
        self.register_buffer("users_L", torch.as_tensor(users).float().clone())

    def covis_BL(
        self, ptr_loc_BP: torch.Tensor, target_B: torch.Tensor | None, cand_BC: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """[log1p users of the place, log1p co-visitation with the window], each [B, L] or [B, C]:
        cov(c) = sum_k [nb_ck in the window] n_ck / sqrt((u(nb_ck) + 1)(u(c) + 1)) over c's Kc co-visited
        places nb_ck (n_ck train users in common, u = train users per place). Leave-own-user-out for
        ``target_B``: the train split is chronological per user, so every window place and the target are
        among the sample's user's train places; that user is taken out of the target's n_ck with every
        window place and out of u(target), so the target's score is the one without this user."""
        B = ptr_loc_BP.shape[0]
        ids_BCK = _per_row(self.covis_ids_LK, cand_BC, B)
        if cand_BC is None:  # window presence at every place, gathered at each place's co-visited places
            pres = visited_mask(ptr_loc_BP, self.covis_ids_LK.shape[0])
            pres_BCK = pres.gather(1, ids_BCK.reshape(B, -1)).reshape(ids_BCK.shape)
        else:  # [B, C, P] comparisons one neighbour rank at a time (never a [B, C, Kc, P] tensor)
            valid = (ptr_loc_BP >= 0).unsqueeze(1)
            cols = [((ids_BCK[:, :, k, None] == ptr_loc_BP.unsqueeze(1)) & valid).any(-1)
                    for k in range(ids_BCK.shape[2])]  # fmt: skip
            pres_BCK = torch.stack(cols, -1).float()
        n_BCK = _per_row(self.covis_cnt_LK, cand_BC, B)
        u_BC = _per_row(self.users_L, cand_BC, B)
        if target_B is not None:
            t = target_B.long().unsqueeze(1)
            own = (torch.arange(u_BC.shape[1], device=t.device) == t) if cand_BC is None else (cand_BC == t)
            n_BCK = (n_BCK - own.float().unsqueeze(2) * pres_BCK).clamp_min(0)
            u_BC = (u_BC - own.float()).clamp_min(0)
        cos = n_BCK * pres_BCK / torch.sqrt((self.users_L[ids_BCK] + 1.0) * (u_BC.unsqueeze(2) + 1.0))
        return [torch.log1p(u_BC), torch.log1p(cos.sum(-1))]

    def counts_BL(
        self,
        batch: dict[str, torch.Tensor],
        target_B: torch.Tensor | None,
        cand_BC: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """log1p of the visit count, the count in the query's time bin and the transition count from the
        current place, each [B, L] (every place) or [B, C] (at ``cand_BC``; padding -1 reads place 0, the
        caller masks it); leave-one-out for ``target_B`` (the sample's own target record)."""
        B = batch["ptr_loc"].shape[0]
        if self.query_time:
            tb = time_bin(batch["query_hour"].long(), batch["query_weekday"].long())
        else:
            tb = time_bin(batch["cur_hour"][:, -1].long(), batch["cur_weekday"][:, -1].long())
        tb = tb.clamp(0, N_TIME_BINS - 1)
        visits = _per_row(self.visits_L, cand_BC, B)
        cur = batch["cur_loc"][:, -1].clamp_min(0)
        ids_BK, cnt_BK = self.succ_ids_LK[cur], self.succ_cnt_LK[cur]
        if cand_BC is None:
            in_bin = self.visits_LT.t()[tb]  # [B, L]
            trans = torch.zeros_like(visits).scatter_add(1, ids_BK, cnt_BK)
        else:
            in_bin = self.visits_LT[cand_BC.clamp_min(0), tb.unsqueeze(1)]  # [B, C]
            match = cand_BC.unsqueeze(2) == ids_BK.unsqueeze(1)  # [B, C, K]: ids are distinct per row
            trans = (match.float() * cnt_BK.unsqueeze(1)).sum(-1)
        if target_B is not None:  # leave one out: the target record is one train visit and one transition
            if cand_BC is None:
                own = F.one_hot(target_B.long(), visits.shape[1]).float()
            else:
                own = (cand_BC == target_B.long().unsqueeze(1)).float()
            t_bin = time_bin(batch["query_hour"].long(), batch["query_weekday"].long())
            visits = (visits - own).clamp_min(0)
            in_bin = (in_bin - own * (t_bin == tb).float().unsqueeze(1)).clamp_min(0)
            trans = (trans - own).clamp_min(0)
        return [torch.log1p(visits), torch.log1p(in_bin), torch.log1p(trans)]

    def features(
        self, batch: dict[str, torch.Tensor], loc_xy_L2: torch.Tensor, pred_xy_B2: torch.Tensor,
        target_B: torch.Tensor | None, cand_BC: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Candidate features f [B, L, F] (every place) or [B, C, F] (at ``cand_BC``) (module docstring); no
        location id enters except through the counts' equality lookups."""
        m = self.metres_per_unit
        xy = loc_xy_L2 if cand_BC is None else loc_xy_L2[cand_BC.clamp_min(0)]  # [L, 2] or [B, C, 2]
        d_cur = _log_dist(batch["cur_xy"][:, -1], xy, m)
        C = batch["cur_xy"].shape[1]
        d_win = torch.stack([_log_dist(batch["cur_xy"][:, c], xy, m) for c in range(C)], -1).amin(-1)
        d_pred = _log_dist(pred_xy_B2, xy, m)
        valid = (batch["ptr_loc"] >= 0).float().unsqueeze(-1)
        n = valid.sum(1).clamp_min(1.0)
        centre = torch.where(valid.sum(1) > 0, (batch["ptr_xy"].float() * valid).sum(1) / n,
                             batch["cur_xy"][:, -1].float())  # fmt: skip
        d_centre = _log_dist(centre, xy, m)
        visits, in_bin, trans = self.counts_BL(batch, target_B, cand_BC)
        feats = [
            d_cur,
            d_win,
            d_pred,
            d_centre,
            visits / 5.0,
            in_bin / 5.0,
            (in_bin - visits) / 2.0,
            trans / 2.0,
        ]
        if self.covisit_k > 0:
            users, covis = self.covis_BL(batch["ptr_loc"], target_B, cand_BC)
            feats += [users / 5.0, covis]
        return torch.stack(feats, -1)

    def forward(
        self,
        h_BD: torch.Tensor,
        batch: dict[str, torch.Tensor],
        pi_BE: torch.Tensor,
        om_BF: torch.Tensor,
        loc_xy_L2: torch.Tensor,
        pred_xy_B2: torch.Tensor,
        target_B: torch.Tensor | None = None,
        cand_BC: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (id-free scores s, fp32: [B, L] over every place when ``cand_BC`` is None, else [B, C] for the
        candidate ids ``cand_BC`` (LongTensor [B, C], -1 = padding, scored NEG); visited places are NOT
        masked here; exploration gate statistics [B, S] without the novelty evidence: ``gate_stats`` adds
        it)."""
        f_BLF = self.features(batch, loc_xy_L2, pred_xy_B2, target_B, cand_BC)
        a_BF = param32(self.a0) + pi_BE.float() @ param32(self.a_persona)
        a_BF = a_BF + om_BF.float() @ param32(self.a_function)
        s_BL = (f_BLF * a_BF.unsqueeze(1)).sum(-1)
        if self.hidden > 0:
            z_BLH = F.gelu(linear32(self.cand_in, f_BLF) + linear32(self.query_in, h_BD.float()).unsqueeze(1))
            v_BH = param32(self.v0) + pi_BE.float() @ param32(self.v_persona)
            v_BH = v_BH + om_BF.float() @ param32(self.v_function)
            s_BL = s_BL + (z_BLH * v_BH.unsqueeze(1)).sum(-1)
        if cand_BC is not None:
            s_BL = torch.where(cand_BC >= 0, s_BL, torch.full_like(s_BL, NEG))
        new_BP = first_visits(batch["ptr_loc"])
        P = new_BP.shape[1]
        tail = (batch["ptr_loc"][:, -min(RATE_WINDOW, P) :] >= 0).float()
        rate = (new_BP[:, -min(RATE_WINDOW, P) :] * tail).sum(-1) / tail.sum(-1).clamp_min(1.0)
        last2 = new_BP[:, -2:] if P >= 2 else F.pad(new_BP, (1, 0))
        return s_BL, torch.cat([rate.unsqueeze(1), last2], -1)


def gate_stats(stats_B3: torch.Tensor, logits_new_BL: torch.Tensor) -> torch.Tensor:
    """[B, S]: the scorer's statistics + the log-sum-exp of the (masked) novelty logits, scaled."""
    ev = torch.logsumexp(logits_new_BL, dim=-1, keepdim=True).clamp(-20, 20) / 5.0
    return torch.cat([stats_B3, ev], -1)


def novelty_log_probs(logits_BL: torch.Tensor, visited_BL: torch.Tensor) -> torch.Tensor:
    """log p_new [B, L]: softmax over the unvisited places; visited places get log-probability NEG-ish
    (exp underflows to 0, finite for export). When every place is visited the distribution is uniform-ish
    over nothing: callers put all mass on the copy then (the gate)."""
    masked = torch.where(visited_BL > 0, torch.full_like(logits_BL, NEG), logits_BL)
    return torch.log_softmax(masked, dim=-1)


def novelty_settings(heads_cfg, info) -> dict | None:
    """The pointer head's ``novelty`` argument from ``model.heads`` and a ``DataInfo`` (None when off);
    counts from ``info.records`` when present."""
    if not heads_cfg.novelty:
        return None
    k, kc = heads_cfg.novelty_transitions, heads_cfg.novelty_covisit
    counts = city_counts(info.records, info.num_locations, k, kc) if info.records is not None else None
    return {"hidden": heads_cfg.novelty_hidden, "top_k": k, "counts": counts, "covisit_k": kc}
