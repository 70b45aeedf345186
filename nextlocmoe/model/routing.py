"""Routing: pure selection functions, entropy, router MLPs and the routing contract.

The one contract every MoE path shares (local, DeepSpeed expert-parallel, frozen export): for T tokens the
router gives ``probs_TE``; selection gives ``ids_TK`` (expert id per slot, -1 = empty slot) and ``w_TK``
(the slot's weight, 0 for an empty slot). Selection is static-shape (sort + cumsum + mask), so the same
functions run eagerly, under DeepSpeed and inside an exported graph.

Shape legend: T tokens, B sequences, S positions, E experts, K routing slots (top_k, or k_max under threshold
routing), D model width, C context width (history vector), P persona/semantic text width, H router hidden
width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nextlocmoe.model.precision import linear32


@dataclass
class RoutingAux:
    """What one MoE layer reports for one forward: kept explicit, assembled into the loss elsewhere."""

    probs_TE: torch.Tensor  # router probabilities (with grad)
    ids_TK: torch.Tensor  # selected experts, -1 = none
    w_TK: torch.Tensor  # their weights (with grad)
    l_aux: torch.Tensor  # load-balancing loss (0 for the local path; DeepSpeed's for expert parallel)
    batch: int = 0  # B when the T tokens are B sequences of equal length (T = B*S, batch-major); 0 = flat

    def tail(self, n: int) -> RoutingAux:
        """The routing of the last ``n`` positions of every sequence (needs ``batch``): [B*n, ...]."""
        if self.batch <= 0:
            raise ValueError("RoutingAux.tail needs the batch size (tokens are not B x S)")
        B = self.batch

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, -1, t.shape[-1])[:, -n:].reshape(B * n, t.shape[-1])

        return RoutingAux(cut(self.probs_TE), cut(self.ids_TK), cut(self.w_TK), self.l_aux, B)

    @property
    def entropy(self) -> torch.Tensor:
        return router_entropy(self.probs_TE)

    @property
    def balance(self) -> torch.Tensor:
        """ln E - H(mean_t p_t) >= 0: 0 when the batch's mean routing distribution is uniform."""
        return marginal_imbalance(self.probs_TE)

    @property
    def position_balance(self) -> torch.Tensor:
        """Mean over positions s of ln E - H(mean_b p_{b,s}) (``positional_imbalance``); needs ``batch``."""
        return positional_imbalance(self.probs_TE.reshape(self.batch, -1, self.probs_TE.shape[-1]))

    def load_E(self) -> torch.Tensor:
        """Fraction of selected (token, slot) pairs per expert, detached, shape [E]."""
        return expert_load(self.ids_TK.detach(), self.probs_TE.shape[-1])


def _sorted_desc(
    probs_TE: torch.Tensor, scale_E: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable descending sort: ties go to the lower expert id, the same in eager, DeepSpeed and ONNX.

    With a balancing bias b (``balance.py``) the ORDER is by log p_e + b_e (selection only), computed as
    p_e * scale_e with ``scale_E = exp(b)`` (one exactly rounded product: eager, DeepSpeed and the engine
    sort identical keys; the frozen export stores scale_E as a constant), and the returned values are the
    unbiased probabilities in that order (the bias decides which experts are chosen, never how much they
    weigh)."""
    if scale_E is None:
        return torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    key_TE = probs_TE * scale_E.to(probs_TE.dtype)
    _, idx = torch.sort(key_TE, dim=-1, descending=True, stable=True)
    return probs_TE.gather(-1, idx), idx


def topk_select(
    probs_TE: torch.Tensor, k: int, scale_E: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection (NextLocMoE Eq. top-k gating). Returns ids_TK, w_TK (no empty slots)."""
    p_sorted, idx = _sorted_desc(probs_TE, scale_E)
    return idx[:, :k], p_sorted[:, :k]


def threshold_select(
    probs_TE: torch.Tensor, tau: float, k_max: int, scale_E: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold (top-p) selection: the smallest prefix of experts by descending probability whose
    cumulative probability reaches ``tau``, capped at ``k_max`` experts. Slot j is used iff the mass of the
    experts before it is < tau. Unused slots: id -1, weight 0. Static shapes: [T, k_max]. With ``scale_E``
    the order is by biased score (see ``_sorted_desc``), the mass by the unbiased probabilities."""
    p_sorted, idx = _sorted_desc(probs_TE, scale_E)
    p_k, idx_k = p_sorted[:, :k_max], idx[:, :k_max]
    mass_before = torch.cumsum(p_k, dim=-1) - p_k
    used = mass_before < tau
    ids = torch.where(used, idx_k, torch.full_like(idx_k, -1))
    return ids, p_k * used.to(p_k.dtype)


def select(
    probs_TE: torch.Tensor,
    mode: str,
    k: int,
    tau: float,
    k_max: int,
    renormalize: bool = False,
    scale_E: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to top-k or threshold selection; optionally renormalise the selected weights to sum 1.
    ``scale_E`` = exp(the router's balancing bias): selection order only (``_sorted_desc``)."""
    if mode == "topk":
        ids, w = topk_select(probs_TE, k, scale_E)
    elif mode == "threshold":
        ids, w = threshold_select(probs_TE, tau, k_max, scale_E)
    else:
        raise ValueError(f"unknown routing mode {mode!r}")
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    return ids, w


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of -sum_e p log p (the NextLocMoE entropy regulariser)."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-12))).sum(-1).mean()


def marginal_imbalance(probs_TE: torch.Tensor) -> torch.Tensor:
    """ln E - H(mean_t p_t): the batch's mean routing distribution's distance from uniform (>= 0).
    With ``router_entropy`` it makes the mutual information between tokens and experts,
    I = H(mean_t p_t) - mean_t H(p_t), the quantity the two terms together maximise (decisive per token,
    balanced over the batch; the token-expert MI objective of Mod-Squad, Chen et al., CVPR 2023)."""
    p_E = probs_TE.float().mean(0)
    return math.log(probs_TE.shape[-1]) + (p_E * torch.log(p_E.clamp_min(1e-12))).sum()


def positional_imbalance(probs_BSE: torch.Tensor) -> torch.Tensor:
    """Mean over positions s of ln E - H(mean_b p_{b,s}): the marginal imbalance across the B samples at
    each position. Pooled over all tokens, ``marginal_imbalance`` is satisfied by routing by POSITION
    (prompt, history and current tokens to different experts) while every sample's token at a given
    position takes the same experts; per position, only routing that depends on the sample lowers it
    (with ``router_entropy`` it is the sample-expert MI at each position, Mod-Squad's objective)."""
    E = probs_BSE.shape[-1]
    p_SE = probs_BSE.float().mean(0)
    return math.log(E) + (p_SE * torch.log(p_SE.clamp_min(1e-12))).sum(-1).mean()


def expert_counts(ids_TK: torch.Tensor, num_experts: int, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """THE expert count: used (token, slot) pairs per expert, [E] float32 on ids' device, detached. Empty
    slots (id -1) and tokens with ``mask_T`` False (padding) are not counted. Used by balancing
    (``balance.py``), the load-balancing loss, the grouped experts' split sizes, DeepSpeed's ``exp_counts``,
    training monitoring and ``explain``."""
    ids = ids_TK.detach()
    if mask_T is not None:
        ids = ids[mask_T.to(ids.device)]
    ids = ids[ids >= 0].long()
    return torch.bincount(ids, minlength=num_experts).to(torch.float32)


def expert_load(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fraction of used slots routed to each expert, [E] float; all zeros if nothing is routed."""
    counts = expert_counts(ids_TK, num_experts)
    return counts / counts.sum().clamp_min(1.0)


def load_balancing_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load-balancing loss E * sum_e mean_t(p_te) * frac_e, frac_e = counts_E / sum(counts_E)
    (share of used (token, slot) pairs on expert e, no gradient). 1.0 when perfectly balanced."""
    E = probs_TE.shape[-1]
    frac_E = counts_E.detach().float() / counts_E.sum().clamp_min(1).float()
    return E * torch.sum(probs_TE.float().mean(0) * frac_E)


def combine_weights_TE(ids_TK: torch.Tensor, w_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Dense [T, E] weight matrix from the slot contract (0 where an expert is not selected; an empty slot
    contributes nothing, not even a gradient). Static-shape (one-hot sum): the folded experts, the pointer's
    routing mix and tests."""
    onehot_TKE = F.one_hot(ids_TK.clamp_min(0), num_experts).to(w_TK.dtype)
    valid_TK = (ids_TK >= 0).to(w_TK.dtype)
    return (onehot_TKE * (w_TK * valid_TK).unsqueeze(-1)).sum(1)


def combine(
    v: torch.Tensor, w: torch.Tensor, token: torch.Tensor | None = None, num_tokens: int = 0
) -> torch.Tensor:
    """THE combine of every MoE path: the weighted sum of each token's expert values, in fp32 whatever the
    activation dtype (model/precision.py: bf16 weights below 2^-8 of the largest would vanish); the caller
    casts once. Two layouts of the same sum:
    - slots: v [T, K, X] per-slot values, w [T, K] -> [T, X] (an empty slot has weight 0);
    - pairs: v [P, X] values of the used (token, slot) pairs, w [P], ``token`` [P] each pair's token
      -> [num_tokens, X] (the grouped experts' sparse layout; index_add, no [T, K, X] buffer)."""
    vw = v.float() * w.float().unsqueeze(-1)
    if token is None:
        return vw.sum(1)
    return vw.new_zeros(num_tokens, v.shape[-1]).index_add(0, token, vw)


class MLPRouter(nn.Module):
    """Softmax router over E experts from a context vector: logits = W2 gelu(W1 ctx). Used by the
    Location-Semantics MoE (ctx = [h_hist ; record embedding])."""

    def __init__(self, in_dim: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_experts))
        self.register_buffer("sel_bias_E", torch.zeros(num_experts), persistent=True)  # balance.py

    def forward(self, ctx_TI: torch.Tensor, prior_TE: torch.Tensor | None = None) -> torch.Tensor:
        """ctx_TI [T, in_dim] (+ fixed prior logits prior_TE [T, E]) -> probs_TE [T, E], computed in fp32
        whatever the module's dtype."""
        with torch.autocast(device_type=ctx_TI.device.type, enabled=False):
            h = F.gelu(linear32(self.net[0], ctx_TI))
            logits_TE = linear32(self.net[2], h)
            if prior_TE is not None:
                logits_TE = logits_TE + prior_TE.float()
            return torch.softmax(logits_TE, dim=-1)


class HistoryAwareRouter(nn.Module):
    """NextLocMoE's history-aware persona router: logit_e(t) = v . gelu(W [x_t ; h_hist ; p_e] + b), then
    top-k / threshold selection (``select``). THE router of every MoE path: the local layer, the
    expert-parallel layer (train/parallel.py) and the frozen export (``freeze``: inference mode) call
    ``route``; nothing else computes router logits.

    The first layer is split by input block (W = [W_x, W_h, W_p]) so the [T, E, H] pre-activation is a sum
    of a token term, a history term and a per-expert persona term: the same function, no [T, E, D+C+P]
    concatenation. Persona embeddings ``persona_EP`` are fixed text semantics (a buffer, not trained).
    The router always computes in fp32 (an fp16/bf16 router flips expert choices).
    """

    def __init__(self, d_model: int, d_ctx: int, persona_EP: torch.Tensor, cfg) -> None:
        """``cfg``: a ``PersonalMoEConfig`` (router_hidden, routing, top_k, tau, k_max, renormalize)."""
        super().__init__()
        self.cfg = cfg
        hidden = cfg.router_hidden
        self.register_buffer("persona_EP", persona_EP.detach().float().clone(), persistent=True)
        self.register_buffer("sel_bias_E", torch.zeros(persona_EP.shape[0]), persistent=True)  # balance.py
        self.w_x = nn.Linear(d_model, hidden, bias=True)
        self.w_h = nn.Linear(d_ctx, hidden, bias=False)
        self.w_p = nn.Linear(persona_EP.shape[1], hidden, bias=False)
        self.v = nn.Linear(hidden, 1, bias=False)
        self.register_buffer("per_EH", None, persistent=False)  # inference mode (``freeze``): W_p p_e

    @property
    def num_experts(self) -> int:
        return int(self.persona_EP.shape[0])

    @torch.no_grad()
    def freeze(self) -> None:
        """Inference mode (export): the persona term W_p p_e becomes a constant [E, H] buffer, so the
        exported graph holds no persona encoder; the math of ``forward`` is otherwise unchanged."""
        self.per_EH = linear32(self.w_p, self.persona_EP).detach().clone()

    def forward(self, x_TD: torch.Tensor, ctx_TC: torch.Tensor) -> torch.Tensor:
        """x_TD [T, D] token states, ctx_TC [T, C] history vector per token -> probs_TE [T, E] fp32.
        Weights and inputs are used in fp32 even when the module was cast to bf16/fp16."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            tok_TH = linear32(self.w_x, x_TD) + linear32(self.w_h, ctx_TC)
            per_EH = self.per_EH if self.per_EH is not None else linear32(self.w_p, self.persona_EP)
            pre_TEH = F.gelu(tok_TH.unsqueeze(1) + per_EH.float().unsqueeze(0))
            logits_TE = linear32(self.v, pre_TEH).squeeze(-1)
            return torch.softmax(logits_TE, dim=-1)

    def route(
        self, x_TD: torch.Tensor, ctx_TC: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router + selection (the routing contract): probs_TE [T, E], ids_TK [T, K] (-1 empty), w_TK [T, K]
        fp32. The balancing bias orders the selection only (``_sorted_desc``)."""
        c = self.cfg
        probs_TE = self(x_TD, ctx_TC)
        scale_E = self.sel_bias_E.float().exp()
        ids_TK, w_TK = select(probs_TE, c.routing, c.top_k, c.tau, c.k_max, c.renormalize, scale_E)
        return probs_TE, ids_TK, w_TK
