"""Dispatch: how a Personalized MoE layer's selected (token, slot) pairs reach the experts and come back.

The seam of ``PersonalMoE`` (personal_moe.py): route -> **dispatch -> experts -> combine** is one call,
``dispatcher(x_TD, probs_TE, ids_TK, w_TK, experts) -> (y_TD, l_aux)``. Parallelism and export swap the
dispatcher (and, where needed, the expert storage), never the layer:

- ``LocalDispatcher(strategy)`` (here): every expert on this device; the layer's ``PersonaExperts`` compute
  by a named strategy (experts.STRATEGIES): ``grouped`` for training, ``masked`` / ``folded`` (static
  shapes, no host sync) for the frozen export, which only calls ``experts.freeze`` first.
  ``aux_loss=True`` also returns the Switch load-balancing loss (``train.moe_parallel=replicated``, so
  ``loss.aux_weight`` means what it means in expert mode).
- ``ExpertParallelDispatcher`` (train/parallel.py): a DeepSpeed ``MoE`` holding this rank's experts;
  DeepSpeed-MoE does the all-to-all (it stays the EP engine).

Shape legend: T tokens, K slots, E experts, D model width.
"""

from __future__ import annotations

import torch
from torch import nn

from nextlocmoe.model.experts import strategy_name
from nextlocmoe.model.routing import expert_counts, load_balancing_loss


class LocalDispatcher(nn.Module):
    """All experts local: y_TD = experts(x_TD, ids_TK, w_TK, strategy). No parameters of its own."""

    def __init__(self, strategy: str = "grouped", aux_loss: bool = False) -> None:
        super().__init__()
        self.strategy, self.aux_loss = strategy_name(strategy), aux_loss

    def forward(
        self,
        x_TD: torch.Tensor,
        probs_TE: torch.Tensor,
        ids_TK: torch.Tensor,
        w_TK: torch.Tensor,
        experts: nn.Module,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> y_TD [T, D] (x's dtype), l_aux (0-dim fp32: the Switch loss with ``aux_loss``, else 0)."""
        y_TD = experts(x_TD, ids_TK, w_TK, self.strategy)
        if self.aux_loss:
            return y_TD, load_balancing_loss(probs_TE, expert_counts(ids_TK, probs_TE.shape[-1]))
        return y_TD, probs_TE.new_zeros((), dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"strategy={self.strategy}, aux_loss={self.aux_loss}"
