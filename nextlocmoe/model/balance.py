"""Auxiliary-loss-free load balancing (Wang, Gao, Zhu et al., "Auxiliary-Loss-Free Load Balancing Strategy
for Mixture-of-Experts", arXiv 2408.15664, 2024; used by DeepSeek-V3): each router keeps a per-expert bias
``sel_bias_E`` (a buffer, not a parameter) that is added to its log-probabilities for SELECTION only
(``routing._sorted_desc``); after each step it moves against the observed load of what was selected:

    b_e <- b_e + rate * sign(mean_load - load_e)        (their Eq. 3: overloaded experts get a lower bias)

Loads are counts of routed slots (empty threshold slots -1 are not counted; nothing is padded here). The
frozen export reads the bias as a constant. Expert-parallel training sums the counts over all ranks first
(``train/``), so every replica of a router keeps the same bias.

Shape legend: E experts, T tokens, K slots.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nextlocmoe.model.routing import RoutingAux, expert_counts


@torch.no_grad()
def update_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> None:
    """In place: b += rate * sign(mean load - load). No-op when nothing was routed."""
    total = counts_E.sum()
    if float(total) <= 0 or rate <= 0:
        return
    load = counts_E.to(bias_E.dtype) / total
    bias_E.add_(rate * torch.sign(1.0 / counts_E.numel() - load))


def balance_routers(
    pairs: list[tuple[torch.Tensor, list[RoutingAux]]],
    rate: float,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """One balancing step (one optimizer step) for (router bias, that router's RoutingAux of every
    micro-batch of the step) pairs; ``reduce`` sums counts over ranks (identity on one device). So the
    update is the same whatever the split into ranks and micro-batches. Returns the counts per router."""
    out = []
    for bias_E, auxes in pairs:
        counts = sum(expert_counts(a.ids_TK, bias_E.numel()) for a in auxes)
        if reduce is not None:
            counts = reduce(counts)
        update_bias(bias_E, counts, rate)
        out.append(counts)
    return out
