"""Level 2: the Personalized MoE that replaces a decoder layer's FFN (single device).

Orchestrates the three concerns that live elsewhere: the history-aware router (``routing.py``), top-k /
threshold selection (``routing.select``) and the shared-base persona experts (``experts.py``).

A HF decoder layer calls ``mlp(hidden)`` with one tensor, so the per-sample history vector and the sink for
routing outputs are bound to the layer right before each model forward (``bind``); the model owns the sink
list and returns its contents as explicit aux outputs (no globals).

Shape legend: B batch, S sequence, T = B*S tokens, D model width, C history width, K slots, E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from nextlocmoe.config import PersonalMoEConfig
from nextlocmoe.model.experts import PersonaExperts
from nextlocmoe.model.routing import HistoryAwareRouter, RoutingAux, select


class PersonalMoE(nn.Module):
    """FFN replacement: y_t = sum_{k} w_tk * expert_{ids_tk}(x_t) with history-aware routing."""

    def __init__(
        self,
        base_mlp: nn.Module,
        cfg: PersonalMoEConfig,
        persona_EP: torch.Tensor,
        d_ctx: int,
        layer_idx: int,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if persona_EP.shape[0] != cfg.num_experts:
            raise ValueError(f"persona embeddings {tuple(persona_EP.shape)} != num_experts {cfg.num_experts}")
        d_model = base_mlp.gate_proj.in_features
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.router = HistoryAwareRouter(d_model, d_ctx, persona_EP, cfg.router_hidden)
        self.experts = PersonaExperts(
            base_mlp,
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            expert_ids=list(range(cfg.num_experts)),
            seed=seed * 1009 + layer_idx,
        )
        self.compute = cfg.compute
        self._ctx_BC: torch.Tensor | None = None
        self._sink: list[RoutingAux] | None = None

    def bind(self, ctx_BC: torch.Tensor | None, sink: list[RoutingAux] | None) -> None:
        """Set this forward's history vectors [B, C] and the list that collects its RoutingAux
        (the model unbinds with ``bind(None, None)`` after the decoder ran)."""
        self._ctx_BC, self._sink = ctx_BC, sink

    def route(self, x_TD: torch.Tensor, ctx_TC: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Router + selection: probs_TE, ids_TK, w_TK (the shared routing contract)."""
        c = self.cfg
        probs_TE = self.router(x_TD, ctx_TC)
        ids_TK, w_TK = select(
            probs_TE, c.routing, c.top_k, c.tau, c.k_max, c.renormalize, self.router.sel_bias_E.exp()
        )
        return probs_TE, ids_TK, w_TK

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if self._ctx_BC is None or self._sink is None:
            raise RuntimeError("PersonalMoE.bind(ctx, sink) must be called before each forward")
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        ctx_TC = self._ctx_BC.repeat_interleave(S, dim=0)
        probs_TE, ids_TK, w_TK = self.route(x_TD, ctx_TC)
        mode = "static" if self.compute == "dense" else "grouped"
        y_TD = self.experts(x_TD, ids_TK, w_TK.to(x_TD.dtype), mode=mode)
        self._sink.append(RoutingAux(probs_TE, ids_TK, w_TK, x_TD.new_zeros((), dtype=torch.float32), B))
        return y_TD.view(B, S, D)
