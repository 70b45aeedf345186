"""The pointer head over retrieved candidates (issue 20, docs/SCALE.md): p(c) = g p_copy(c) + (1 - g)
p_gen(c) over each sample's candidate set (model/candidates.py) instead of over every known place.

- **Copy**: the pointer's slot scores and weights exactly as in the full head (model/pointer.py); the slot
  weights are summed onto the first candidate entry of each place (``candidates.dedupe``).
- **Generator, id-free**: the full head's learned per-place embedding and bias (L x M parameters whose
  dense gradient and optimizer state grow with L) are replaced by the train-split counts they learn:

      gen(c) = (a + A h) . [log(1 + visits_c), log(1 + transitions cur -> c)]
               - beta_c ||xy_cur - xy_c|| - beta_p ||pred - xy_c||

  On a training batch both counts are leave-one-out (the sample's own target record and its transition
  from the current place are subtracted), so no training score sees its own target. No parameter has a
  place dimension: a step's parameters, gradients and optimizer state do not depend on L.
- **Gate** as in the full head; the output is log p over the candidates [B, C], padding and duplicate
  entries NEG, with the candidate ids [B, C] (-1 there).

Training (``target_loc`` in the batch and the module in training mode) appends the target and the batch's
targets to the candidates: a sampled softmax whose negatives are the retrieved places (and the other
samples' targets). Evaluation and export never read the target; a target outside the set is a miss.

Shape legend: B batch, P pointer slots, C candidates, D model width, E persona experts, Es function experts.
"""

from __future__ import annotations

import torch
from torch import nn

from nextlocmoe.model.candidates import CandidateIndex, RetrievalTables, dedupe
from nextlocmoe.model.pointer import NEG, PointerScoredHead, dist
from nextlocmoe.model.precision import linear32, param32

N_COUNT_FEATURES = 2


class RetrievalPointerHead(PointerScoredHead):
    """(log p [B, C], candidate ids [B, C]) of the copy / explore mixture over retrieved candidates."""

    def __init__(
        self,
        d_model: int,
        loc_xy_L2: torch.Tensor,
        tables: RetrievalTables,
        hidden: int,
        num_personas: int,
        num_functions: int,
        metres_per_unit: float,
        query_time: bool = True,
        in_batch: bool = True,
    ) -> None:
        super().__init__(d_model, loc_xy_L2, 1, hidden, num_personas, num_functions, metres_per_unit,
                         query_time, None, location_params=False)  # fmt: skip
        self.index = CandidateIndex(tables, in_batch)
        self.count_w = nn.Linear(d_model, N_COUNT_FEATURES)  # (a + A h): weights of the count features
        with torch.no_grad():
            self.count_w.weight.zero_()
            self.count_w.bias.fill_(1.0)

    def candidate_gen(
        self,
        h_BD: torch.Tensor,
        cand_BC: torch.Tensor,
        pred_xy_B2: torch.Tensor,
        batch: dict[str, torch.Tensor],
        target_B: torch.Tensor | None,
    ) -> torch.Tensor:
        """Generator logits [B, C] of the candidates (module docstring), leave-one-out for ``target_B``."""
        xy_BC2 = self.loc_xy_L2[cand_BC.clamp_min(0)]
        d_cur = dist(xy_BC2, batch["cur_xy"][:, -1].unsqueeze(1))
        d_pred = dist(xy_BC2, pred_xy_B2.unsqueeze(1))
        visits = self.index.visits_L[cand_BC.clamp_min(0)]
        trans = self.index.transitions(cand_BC, batch["cur_loc"][:, -1].long())
        if target_B is not None:  # leave one out: the target record is one visit and one transition
            own = (cand_BC == target_B.unsqueeze(1)).float()
            visits, trans = (visits - own).clamp_min(0), (trans - own).clamp_min(0)
        f_BCF = torch.stack([torch.log1p(visits), torch.log1p(trans)], -1)
        w_BF = linear32(self.count_w, h_BD)
        beta = torch.exp(param32(self.log_beta))
        return (f_BCF * w_BF.unsqueeze(1)).sum(-1) - beta[0] * d_cur - beta[1] * d_pred

    def forward(
        self,
        h_BD: torch.Tensor,
        pred_xy_B2: torch.Tensor,
        batch: dict[str, torch.Tensor],
        pi_BE: torch.Tensor,
        om_BF: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (log p [B, C] in fp32, candidate ids [B, C]; -1 / NEG on padding and duplicates)."""
        h_BD = h_BD.float()
        target = batch.get("target_loc") if self.training else None
        a_BP = self.copy_scores(h_BD, batch, pi_BE, om_BF)
        w_BP = self.slot_weights(a_BP, batch["ptr_loc"])
        raw_BC = self.index.retrieve(batch, target)
        P, C = a_BP.shape[1], raw_BC.shape[1]
        w_BC = torch.cat([w_BP, w_BP.new_zeros(w_BP.shape[0], C - P)], 1)
        cand_BC, p_copy = dedupe(raw_BC, w_BC)
        valid = cand_BC >= 0
        gen = self.candidate_gen(h_BD, cand_BC, pred_xy_B2, batch, target)
        p_gen = torch.softmax(torch.where(valid, gen, torch.full_like(gen, NEG)), dim=-1)
        g = self.gate(h_BD, self.copy_stats(a_BP, batch["ptr_loc"]), batch["ptr_loc"])
        logp = torch.log(g * p_copy + (1 - g) * p_gen + 1e-12)
        return torch.where(valid, logp, torch.full_like(logp, NEG)), cand_BC
