"""Prediction heads: coordinate, duration, and the candidate-scoring head (MODEL.md "ranking heads").

Shape legend: B batch, D model width, L known locations, M location-embedding width.
"""

from __future__ import annotations

import torch
from torch import nn

from nextlocmoe.model.precision import linear32, param32


class PointHeads(nn.Module):
    """Last hidden state -> normalised (x, y) [B, 2] and duration [B] (Linear + ReLU), computed in fp32
    whatever the parameters' dtype (model/precision.py: a bf16 point is quantised to ~100 m)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.xy = nn.Linear(d_model, 2)
        self.dur = nn.Linear(d_model, 1)

    def forward(self, h_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return linear32(self.xy, h_BD), torch.relu(linear32(self.dur, h_BD)).squeeze(-1)


def visit_counts(loc_BN: torch.Tensor, num_locations: int) -> torch.Tensor:
    """[B, N] location ids (-1 = padding) -> [B, L] visit counts (scatter-add: static shapes, exportable)."""
    valid = (loc_BN >= 0).float()
    counts = torch.zeros(loc_BN.shape[0], num_locations, dtype=torch.float32, device=loc_BN.device)
    return counts.scatter_add(1, loc_BN.clamp_min(0), valid)


class ScoredHead(nn.Module):
    """Candidate scoring over every known location l (normalised units):

        s(l) = <W h, e_l> - beta * ||pred - xy_l|| + a_h log(1 + n_hist(l)) + a_c log(1 + n_cur(l))

    ``loc_xy_L2`` (normalised coordinates of the location table) is a buffer; ``e_l`` a learned embedding;
    n_hist / n_cur count the location in the sample's own history / current window (the user's history as
    a candidate set, MODEL.md "ranking heads"); beta, a_h, a_c are learned scalars.
    """

    def __init__(self, d_model: int, loc_xy_L2: torch.Tensor, d_emb: int) -> None:
        super().__init__()
        self.register_buffer("loc_xy_L2", loc_xy_L2.float().clone(), persistent=True)
        self.loc_emb = nn.Embedding(loc_xy_L2.shape[0], d_emb)
        nn.init.normal_(self.loc_emb.weight, std=0.02)
        self.query = nn.Linear(d_model, d_emb, bias=False)
        self.log_beta = nn.Parameter(torch.zeros(1))  # shape [1]: DeepSpeed cannot flatten 0-dim params
        self.a_hist = nn.Parameter(torch.ones(1))
        self.a_cur = nn.Parameter(torch.ones(1))

    def forward(
        self,
        h_BD: torch.Tensor,
        pred_xy_B2: torch.Tensor,
        hist_loc_BH: torch.Tensor,
        cur_loc_BC: torch.Tensor,
    ) -> torch.Tensor:
        """-> scores [B, L] (fp32)."""
        L = self.loc_xy_L2.shape[0]
        q_BM = linear32(self.query, h_BD)
        diff_BL2 = pred_xy_B2.float().unsqueeze(1) - self.loc_xy_L2.float().unsqueeze(0)
        dist_BL = torch.sqrt((diff_BL2 * diff_BL2).sum(-1) + 1e-12)
        s = q_BM @ param32(self.loc_emb.weight).t() - torch.exp(param32(self.log_beta)) * dist_BL
        s = s + param32(self.a_hist) * torch.log1p(visit_counts(hist_loc_BH, L))
        return s + param32(self.a_cur) * torch.log1p(visit_counts(cur_loc_BC, L))
