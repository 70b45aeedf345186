"""History identity: a copy-vs-explore candidate scorer (docs/MODEL_QUALITY.md, MODEL.md "history identity").

p(l) = g * p_copy(l) + (1 - g) * p_gen(l) over every known location l, returned as log p (the "scored"
ranking; the loss is its negative log-likelihood).

- **Pointer (copy)**: slots = the P records right before the target (the user's own, any split). Each slot
  j gets id-free features phi_j (recency in records and hours, in the current window, hour / weekday match
  with the query time, "follows the current place" first and second order, same place as the current one,
  distance to the current place). Slot score a_j = z_j . (v_0 + sum_e pi_e v_e + sum_f omega_f u_f) with
  z_j = gelu(W phi_j + Q h): the persona routing weights pi (last token, mean over personalized MoE
  layers) and the function routing weights omega (last current record) select the scoring vectors, so the
  routers shape which past records are copied. p_copy(l) = sum_{j: loc_j = l} softmax_j(a)
  (scatter-add: static shapes, exportable). Counting is implicit: a place seen often collects many slots.
- **Generator (explore)**: logits_gen(l) = <W_g h, e_l> + b_l - beta_c ||xy_cur - xy_l|| - beta_p
  ||pred - xy_l||: a learned location embedding and bias (the city's transitions and popularity are learned
  as parameters, no count table that could contain a training target) and distances (id-free).
- **Gate**: g = sigmoid(w . [gelu(G h) ; logsumexp_j a_j ; log #slots]).
- **Exploration** (``novelty=True``, model/novelty.py): p_gen is replaced by p_new, a softmax over the
  places NOT in the pointer window of gen(l) + an id-free, persona- and function-routed candidate score;
  the gate also sees the user's first-visit share and the novelty evidence, and becomes P(repeat).

Shape legend: B batch, P pointer slots, F slot features, Hd hidden width, D model width, E persona experts,
Es function experts, L known locations, M location-embedding width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nextlocmoe.model.novelty import (
    N_GATE_STATS,
    CityCounts,
    NoveltyScorer,
    gate_stats,
    novelty_log_probs,
    visited_mask,
)
from nextlocmoe.model.precision import linear32, param32

N_SLOT_FEATURES = 13
NEG = -1e4  # masked slot score (exp underflows to 0; finite, so no NaN in softmax / export)


def _circ_hour_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Circular hour distance in 0..12."""
    d = (a - b).abs() % 24
    return torch.minimum(d, 24 - d)


def slot_features(batch: dict[str, torch.Tensor], metres_per_unit: float, query_time: bool) -> torch.Tensor:
    """Id-free per-slot features phi [B, P, F] from the pointer window (store.POINTER_KEYS) and the last
    current record. Location ids are only compared for equality (same place / follows the current place)."""
    loc_BP = batch["ptr_loc"]
    B, P = loc_BP.shape
    valid = (loc_BP >= 0).float()
    cur_last = batch["cur_loc"][:, -1:]
    cur_prev = batch["cur_loc"][:, -2:-1] if batch["cur_loc"].shape[1] > 1 else torch.full_like(cur_last, -2)
    prev1 = F.pad(loc_BP[:, :-1], (1, 0), value=-3)  # loc of slot j-1
    prev2 = F.pad(loc_BP[:, :-2], (2, 0), value=-3)
    follows = (prev1 == cur_last).float()
    follows2 = follows * (prev2 == cur_prev).float()
    pos = torch.arange(P, device=loc_BP.device, dtype=torch.float32)
    ago = torch.log1p(P - 1 - pos).unsqueeze(0).expand(B, P) / math.log(P + 1)
    age_h = torch.log1p(batch["ptr_age_h"].float().clamp_min(0)) / 8.0
    in_cur = (pos >= P - batch["cur_loc"].shape[1]).float().unsqueeze(0).expand(B, P)
    d_cur = (batch["ptr_xy"].float() - batch["cur_xy"][:, -1:].float()).norm(dim=-1) * metres_per_unit
    log_d = torch.log1p(d_cur / 100.0) / 5.0
    same = (loc_BP == cur_last).float()
    feats = [ago, age_h, in_cur, follows, follows2, same, log_d]
    if query_time:
        hd = _circ_hour_diff(batch["ptr_hour"], batch["query_hour"].unsqueeze(1)).float()
        wd_q, wd_s = batch["query_weekday"].unsqueeze(1), batch["ptr_weekday"]
        weekend_same = ((wd_q >= 5) == (wd_s >= 5)).float()
        gap = torch.log1p(batch["query_gap_h"].float().clamp_min(0)).unsqueeze(1).expand(B, P) / 8.0
        feats += [torch.cos(hd * (math.pi / 12)), (hd == 0).float(), (hd <= 1).float(),
                  (wd_q == wd_s).float(), weekend_same, gap]  # fmt: skip
    else:
        feats += [torch.zeros_like(ago)] * 6
    return torch.stack(feats, -1) * valid.unsqueeze(-1)


def dist(a_X2: torch.Tensor, b_X2: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between broadcastable point arrays [..., 2] (explicit: exports as plain
    elementwise ops)."""
    diff = a_X2.float() - b_X2.float()
    return torch.sqrt((diff * diff).sum(-1) + 1e-12)


def _dist_BL(xy_B2: torch.Tensor, xy_L2: torch.Tensor) -> torch.Tensor:
    """Distances [B, L] from each sample's point to every place."""
    return dist(xy_B2.unsqueeze(1), xy_L2.unsqueeze(0))


class PointerScoredHead(nn.Module):
    """log p(l) [B, L] of the copy / explore mixture (module docstring). Parameters that belong to the
    training data set's location table: ``loc_emb``, ``loc_bias`` and the buffer ``loc_xy_L2``."""

    def __init__(
        self,
        d_model: int,
        loc_xy_L2: torch.Tensor,
        d_emb: int,
        hidden: int,
        num_personas: int,
        num_functions: int,
        metres_per_unit: float,
        query_time: bool = True,
        novelty: dict | None = None,
        location_params: bool = True,
    ) -> None:
        """``novelty``: None (the generator over every place) or the exploration head's settings
        {"hidden": int, "top_k": int, "counts": CityCounts | None, "covisit_k": int} (model/novelty.py).
        ``location_params=False``: no per-place parameters (the retrieval head, model/retrieval.py)."""
        super().__init__()
        self.register_buffer("loc_xy_L2", loc_xy_L2.float().clone(), persistent=True)
        self.metres_per_unit, self.query_time = float(metres_per_unit), bool(query_time)
        L = loc_xy_L2.shape[0]
        self.slot_in = nn.Linear(N_SLOT_FEATURES, hidden)
        self.query_in = nn.Linear(d_model, hidden, bias=False)
        self.v0 = nn.Parameter(torch.zeros(hidden))
        self.v_persona = nn.Parameter(torch.zeros(num_personas, hidden))
        self.v_function = nn.Parameter(torch.zeros(max(num_functions, 1), hidden))
        if location_params:
            self.loc_emb = nn.Embedding(L, d_emb)
            nn.init.normal_(self.loc_emb.weight, std=0.02)
            self.loc_bias = nn.Embedding(L, 1)
            nn.init.zeros_(self.loc_bias.weight)
            self.gen_query = nn.Linear(d_model, d_emb, bias=False)
        self.log_beta = nn.Parameter(torch.zeros(2))  # [current-place, predicted-point] distance scales
        self.gate_h = nn.Linear(d_model, hidden)
        self.novel: NoveltyScorer | None = None
        if novelty is not None:
            counts: CityCounts | None = novelty.get("counts")
            self.novel = NoveltyScorer(
                d_model, int(novelty["hidden"]), num_personas, num_functions, L, metres_per_unit,
                query_time, int(novelty["top_k"]), counts, int(novelty.get("covisit_k", 0)),
            )  # fmt: skip
        self.gate_out = nn.Linear(hidden + 2 + (N_GATE_STATS if novelty is not None else 0), 1)
        with torch.no_grad():  # start from "copy with recency + transitions" rather than from zero
            self.v0.normal_(0, 0.1)

    def copy_scores(
        self, h_BD: torch.Tensor, batch: dict[str, torch.Tensor], pi_BE: torch.Tensor, om_BF: torch.Tensor
    ) -> torch.Tensor:
        """Slot scores a [B, P] (masked slots NEG)."""
        phi = slot_features(batch, self.metres_per_unit, self.query_time)
        z_BPH = F.gelu(linear32(self.slot_in, phi) + linear32(self.query_in, h_BD).unsqueeze(1))
        v_BH = param32(self.v0) + pi_BE.float() @ param32(self.v_persona)
        v_BH = v_BH + om_BF.float() @ param32(self.v_function)
        a_BP = (z_BPH * v_BH.unsqueeze(1)).sum(-1)
        return torch.where(batch["ptr_loc"] >= 0, a_BP, torch.full_like(a_BP, NEG))

    def gen_logits(
        self, h_BD: torch.Tensor, pred_xy_B2: torch.Tensor, cur_xy_B2: torch.Tensor
    ) -> torch.Tensor:
        """Explore logits [B, L]."""
        d_cur, d_pred = _dist_BL(cur_xy_B2, self.loc_xy_L2), _dist_BL(pred_xy_B2, self.loc_xy_L2)
        beta = torch.exp(param32(self.log_beta))
        s = linear32(self.gen_query, h_BD) @ param32(self.loc_emb.weight).t()
        s = s + param32(self.loc_bias.weight).t()
        return s - beta[0] * d_cur - beta[1] * d_pred

    def forward(
        self,
        h_BD: torch.Tensor,
        pred_xy_B2: torch.Tensor,
        batch: dict[str, torch.Tensor],
        pi_BE: torch.Tensor,
        om_BF: torch.Tensor,
    ) -> torch.Tensor:
        """-> log p [B, L], computed in fp32 whatever the parameters' dtype (model/precision.py). In
        training mode with the exploration head, ``batch["target_loc"]`` (when present) makes its counts
        leave-one-out (model/novelty.py); evaluation never reads it."""
        h_BD = h_BD.float()
        a_BP = self.copy_scores(h_BD, batch, pi_BE, om_BF)
        w_BP = self.slot_weights(a_BP, batch["ptr_loc"])
        L = self.loc_xy_L2.shape[0]
        p_copy = torch.zeros(a_BP.shape[0], L, dtype=torch.float32, device=a_BP.device)
        p_copy = p_copy.scatter_add(1, batch["ptr_loc"].clamp_min(0), w_BP)
        gen = self.gen_logits(h_BD, pred_xy_B2, batch["cur_xy"][:, -1])
        stats = self.copy_stats(a_BP, batch["ptr_loc"])
        if self.novel is None:
            p_gen = torch.softmax(gen, dim=-1)
        else:
            target = batch.get("target_loc") if self.training else None
            s_BL, explore_BS = self.novel(h_BD, batch, pi_BE, om_BF, self.loc_xy_L2, pred_xy_B2, target)
            visited = visited_mask(batch["ptr_loc"], L)
            logits_new = torch.where(visited > 0, torch.full_like(gen, NEG), gen + s_BL)
            p_gen = torch.exp(novelty_log_probs(logits_new, visited))
            stats = torch.cat([stats, gate_stats(explore_BS, logits_new)], -1)
        g = self.gate(h_BD, stats, batch["ptr_loc"])
        return torch.log(g * p_copy + (1 - g) * p_gen + 1e-12)

    @staticmethod
    def slot_weights(a_BP: torch.Tensor, ptr_loc_BP: torch.Tensor) -> torch.Tensor:
        """The copy distribution over slots [B, P] (masked slots 0)."""
        return torch.softmax(a_BP, dim=-1) * (ptr_loc_BP >= 0).float()

    @staticmethod
    def copy_stats(a_BP: torch.Tensor, ptr_loc_BP: torch.Tensor) -> torch.Tensor:
        """The gate's copy evidence [B, 2]: scaled log-sum-exp of the slot scores and log #valid slots."""
        n_slots = (ptr_loc_BP >= 0).float().sum(-1, keepdim=True)
        evidence = torch.logsumexp(a_BP, dim=-1, keepdim=True)
        return torch.cat([evidence.clamp(-20, 20) / 5.0, torch.log1p(n_slots) / 5.0], -1)

    def gate(self, h_BD: torch.Tensor, stats: torch.Tensor, ptr_loc_BP: torch.Tensor) -> torch.Tensor:
        """g = P(copy) [B, 1] from the hidden state and the statistics; 0 when the window is empty."""
        gate_in = torch.cat([F.gelu(linear32(self.gate_h, h_BD)), stats], -1)
        g = torch.sigmoid(linear32(self.gate_out, gate_in))
        return g * ((ptr_loc_BP >= 0).sum(-1, keepdim=True) > 0).float()
