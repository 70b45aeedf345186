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


def expert_load(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fraction of used slots routed to each expert, [E] float; all zeros if nothing is routed."""
    valid = ids_TK >= 0
    counts = torch.zeros(num_experts, dtype=torch.float32, device=ids_TK.device)
    counts.index_add_(0, ids_TK[valid].long(), torch.ones_like(ids_TK[valid], dtype=torch.float32))
    return counts / counts.sum().clamp_min(1.0)


def combine_weights_TE(ids_TK: torch.Tensor, w_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Dense [T, E] weight matrix from the slot contract (0 where an expert is not selected).
    Static-shape (one-hot sum), used by the dense/export compute and by tests."""
    onehot_TKE = F.one_hot(ids_TK.clamp_min(0), num_experts).to(w_TK.dtype)
    return (onehot_TKE * w_TK.unsqueeze(-1)).sum(1)


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
    """NextLocMoE's history-aware persona router: logit_e(t) = v . gelu(W [x_t ; h_hist ; p_e] + b).

    The first layer is split by input block (W = [W_x, W_h, W_p]) so the [T, E, H] pre-activation is a sum
    of a token term, a history term and a per-expert persona term: the same function, no [T, E, D+C+P]
    concatenation. Persona embeddings ``persona_EP`` are fixed text semantics (a buffer, not trained).
    The router always computes in fp32 (an fp16/bf16 router flips expert choices).
    """

    def __init__(self, d_model: int, d_ctx: int, persona_EP: torch.Tensor, hidden: int) -> None:
        super().__init__()
        self.register_buffer("persona_EP", persona_EP.detach().float().clone(), persistent=True)
        self.register_buffer("sel_bias_E", torch.zeros(persona_EP.shape[0]), persistent=True)  # balance.py
        self.w_x = nn.Linear(d_model, hidden, bias=True)
        self.w_h = nn.Linear(d_ctx, hidden, bias=False)
        self.w_p = nn.Linear(persona_EP.shape[1], hidden, bias=False)
        self.v = nn.Linear(hidden, 1, bias=False)

    @property
    def num_experts(self) -> int:
        return int(self.persona_EP.shape[0])

    def forward(self, x_TD: torch.Tensor, ctx_TC: torch.Tensor) -> torch.Tensor:
        """x_TD [T, D] token states, ctx_TC [T, C] history vector per token -> probs_TE [T, E] fp32.
        Weights and inputs are used in fp32 even when the module was cast to bf16/fp16."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            tok_TH = linear32(self.w_x, x_TD) + linear32(self.w_h, ctx_TC)
            per_EH = linear32(self.w_p, self.persona_EP)
            pre_TEH = F.gelu(tok_TH.unsqueeze(1) + per_EH.unsqueeze(0))
            logits_TE = linear32(self.v, pre_TEH).squeeze(-1)
            return torch.softmax(logits_TE, dim=-1)
