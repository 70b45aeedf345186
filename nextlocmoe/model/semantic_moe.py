"""Level 1: the Location-Semantics MoE (NextLocMoE embedding-level MoE).

K_s = 5 function experts, each a Linear(2 -> d_loc) on the normalised coordinate, initialised from a text
embedding of its category description; a history-conditioned router (MLP on [h_hist ; record embedding])
selects the top-2; enhanced location embedding = base location embedding + sum_k w_k expert_k(coord).
Reuses ``routing.py`` (selection, combine weights, RoutingAux): no MoE logic of its own.

Shape legend: T records (B*C), E = 5 experts, L = d_loc, P text width, R = d_rec.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nextlocmoe.model.precision import param32
from nextlocmoe.model.routing import MLPRouter, RoutingAux, combine, combine_weights_TE, topk_select


def project_text_to_weights(text_EP: torch.Tensor, d_loc: int, seed: int = 0) -> torch.Tensor:
    """Fixed Gaussian random projection (Johnson-Lindenstrauss) of text embeddings to expert weights
    [E, d_loc, 2]: the experts' pairwise geometry follows the descriptions' semantic similarity. Scaled so
    each weight matrix has the scale of nn.Linear(2, d_loc)'s default init."""
    gen = torch.Generator().manual_seed(seed)
    P = text_EP.shape[1]
    proj = torch.randn(P, d_loc * 2, generator=gen) / math.sqrt(P)
    text = torch.nn.functional.normalize(text_EP.float(), dim=-1)
    w = (text @ proj).view(-1, d_loc, 2)
    return w / w.flatten(1).std(dim=1).clamp_min(1e-12).view(-1, 1, 1) / math.sqrt(3 * 2)


def time_prior_table(slot_NP: torch.Tensor, text_EP: torch.Tensor) -> torch.Tensor:
    """[N, E] prior logits for N visit-time slots (``text.time_slot_texts``): cosine similarity of each
    slot's description to each category's text, centred per slot (softmax ignores a per-slot shift) and
    scaled to unit standard deviation. A label-free, text-only link between a record's observable time
    and the experts' names (the zero-shot classification of CLIP, Radford et al. 2021, applied to visit
    times); no venue category is read."""
    a = torch.nn.functional.normalize(slot_NP.float(), dim=-1)
    b = torch.nn.functional.normalize(text_EP.float(), dim=-1)
    sim_NE = a @ b.T
    sim_NE = sim_NE - sim_NE.mean(-1, keepdim=True)
    return sim_NE / sim_NE.std().clamp_min(1e-6)


class SemanticMoE(nn.Module):
    def __init__(
        self,
        text_EP: torch.Tensor,
        d_loc: int,
        d_rec: int,
        hidden: int,
        top_k: int,
        prior_NE: torch.Tensor | None = None,
    ) -> None:
        """``prior_NE`` (optional): router prior logits per visit-time slot, already scaled
        (``time_prior_table`` x ``semantic_moe.time_prior``); a fixed buffer, not trained."""
        super().__init__()
        self.w_ELI = nn.Parameter(project_text_to_weights(text_EP, d_loc))
        self.router = MLPRouter(2 * d_rec, hidden, text_EP.shape[0])
        self.top_k = top_k
        if prior_NE is not None:
            self.register_buffer("prior_NE", prior_NE.detach().float().clone(), persistent=True)
        else:
            self.prior_NE = None

    @property
    def num_experts(self) -> int:
        return int(self.w_ELI.shape[0])

    def forward(
        self,
        xy_T2: torch.Tensor,
        base_TL: torch.Tensor,
        ctx_T2R: torch.Tensor,
        slot_T: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RoutingAux]:
        """xy_T2 normalised coords, base_TL base location embedding, ctx_T2R [h_hist ; record embedding],
        slot_T the records' visit-time slots (weekday * 24 + hour; read only with a time prior)
        -> enhanced [T, L] and the routing aux."""
        prior_TE = None
        if self.prior_NE is not None:
            if slot_T is None:
                raise ValueError("SemanticMoE with a time prior needs the records' time slots")
            prior_TE = self.prior_NE[slot_T.long().clamp(0, self.prior_NE.shape[0] - 1)]
        probs_TE = self.router(ctx_T2R, prior_TE)
        ids_TK, w_TK = topk_select(probs_TE, self.top_k, self.router.sel_bias_E.exp())
        # experts and their combine in fp32 (model/precision.py), cast to the embedding's dtype once
        out_TEL = torch.einsum("ti,eli->tel", xy_T2.float(), param32(self.w_ELI))
        w_TE = combine_weights_TE(ids_TK, w_TK.float(), self.num_experts)
        enhanced_TL = base_TL + combine(out_TEL, w_TE).to(base_TL.dtype)
        return enhanced_TL, RoutingAux(probs_TE, ids_TK, w_TK, xy_T2.new_zeros((), dtype=torch.float32))
