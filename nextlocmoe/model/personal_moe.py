"""Level 2: the Personalized MoE that replaces a decoder layer's FFN: ONE layer class for every path.

route (``HistoryAwareRouter.route``, routing.py) -> dispatch -> experts -> combine (``dispatcher``,
dispatch.py; experts.py). Parallelism (train/parallel.py: DeepSpeed expert parallel) and export
(export/freeze.py: inference mode) swap the dispatcher and, where needed, the expert storage; the layer,
its router and its routing record are the same object everywhere (found by ``isinstance(m, PersonalMoE)``).

Routing context. A HF decoder layer calls ``mlp(hidden)`` with one tensor, so the per-sample history vector
cannot be an argument. The model owns one ``RoutingContext`` shared by all its layers (a plain object, not a
module): ``with ctx.scope(h_BC) as records:`` around the decoder call gives the layers this forward's
history and collects each layer's ``RoutingAux`` into ``records`` (returned by the model as explicit aux;
no globals). Outside a scope a layer raises.

Shape legend: B batch, S sequence, T = B*S tokens, D model width, C history width, K slots, E experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from nextlocmoe.config import PersonalMoEConfig
from nextlocmoe.model.dispatch import LocalDispatcher
from nextlocmoe.model.experts import PersonaExperts
from nextlocmoe.model.routing import HistoryAwareRouter, RoutingAux


class RoutingContext:
    """One forward's routing inputs (history vectors [B, C]) and outputs (one RoutingAux per layer, in
    call order), shared by a model's MoE layers."""

    def __init__(self) -> None:
        self.history_BC: torch.Tensor | None = None
        self.records: list[RoutingAux] | None = None

    @contextmanager
    def scope(self, history_BC: torch.Tensor) -> Iterator[list[RoutingAux]]:
        """Open this forward's routing scope; the yielded list receives every layer's RoutingAux. Closed
        on exit (also on error), so no layer keeps the forward's graph alive."""
        if self.records is not None:
            raise RuntimeError("RoutingContext.scope: already inside a forward (nested model calls?)")
        self.history_BC, self.records = history_BC, []
        try:
            yield self.records
        finally:
            self.history_BC, self.records = None, None

    def __deepcopy__(self, memo: dict) -> RoutingContext:
        return RoutingContext()  # a copied model gets its own (empty) context, shared by its copied layers


class PersonalMoE(nn.Module):
    """FFN replacement: y_t = sum_{k} w_tk * expert_{ids_tk}(x_t) with history-aware routing."""

    def __init__(
        self,
        base_mlp: nn.Module,
        cfg: PersonalMoEConfig,
        persona_EP: torch.Tensor,
        d_ctx: int,
        layer_idx: int,
        context: RoutingContext,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if persona_EP.shape[0] != cfg.num_experts:
            raise ValueError(f"persona embeddings {tuple(persona_EP.shape)} != num_experts {cfg.num_experts}")
        d_model = base_mlp.gate_proj.in_features
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.context = context
        self.router = HistoryAwareRouter(d_model, d_ctx, persona_EP, cfg)
        self.experts: nn.Module | None = PersonaExperts(
            base_mlp,
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            expert_ids=list(range(cfg.num_experts)),
            seed=seed * 1009 + layer_idx,
        )
        self.dispatcher: nn.Module = LocalDispatcher(cfg.compute)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """x_BSD [B, S, D] -> [B, S, D]; appends this layer's RoutingAux to the context's records."""
        ctx = self.context
        if ctx.records is None or ctx.history_BC is None:
            raise RuntimeError("PersonalMoE called outside RoutingContext.scope (the model opens it)")
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        probs_TE, ids_TK, w_TK = self.router.route(x_TD, ctx.history_BC.repeat_interleave(S, dim=0))
        y_TD, l_aux = self.dispatcher(x_TD, probs_TE, ids_TK, w_TK, self.experts)
        ctx.records.append(RoutingAux(probs_TE, ids_TK, w_TK, l_aux.float(), B))
        return y_TD.view(B, S, D)
