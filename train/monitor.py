"""Expert-load monitoring for metrics.jsonl: per personalized MoE layer, the load a DeepSpeed-MoE user
expects to watch (padding tokens excluded), dead experts, min/max load, capacity, capacity-padding ratio and
the share of dropped (token, slot) pairs.

``expert_stats`` is a pure function of per-layer counts (reusable for other diagnostics); ``layer_rows``
gathers the counts of one step's RoutingAux list, sums them over all ranks (one collective, on the
accelerator's device) and returns one row per layer.

Shape legend: B batch, H history records, C current records, S sequence, T = B*S tokens, K slots, E experts,
L MoE layers.
"""

from __future__ import annotations

from typing import Any

import torch

from nextlocmoe.model.layout import prompt_len, sequence_mask
from nextlocmoe.model.routing import RoutingAux, expert_counts


def token_mask(batch: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
    """[T] bool, False on padded history positions of the decoder sequence (model/layout.py), flattened
    batch-major as the MoE layers see it."""
    hist_BH = batch["hist_mask"]
    B, H = hist_BH.shape
    C = batch["cur_xy"].shape[1]
    return sequence_mask(hist_BH, prompt_len(tokens // B, H, C), C).reshape(-1)


def expert_stats(
    counts_E: list[float],
    capacity: int | None = None,
    world: int = 1,
    dispatched: float = 0.0,
    dropped: float = 0.0,
    routed: float = 0.0,
) -> dict[str, Any]:
    """One MoE layer's figures from global counts.

    counts_E: pairs per expert over all ranks, padding excluded. capacity: per-expert buffer rows of one
    rank (expert mode; None when there are no capacity buffers). dispatched: pairs that entered the
    buffers over all ranks (padding tokens included: they occupy capacity). dropped / routed: pairs cut by
    the capacity / all selected pairs, over all ranks.
    """
    E = len(counts_E)
    total = float(sum(counts_E))
    share = [c / total if total else 0.0 for c in counts_E]
    slots = world * E * capacity if capacity else 0
    return {
        "tokens": int(total),
        "dead": sum(1 for c in counts_E if c == 0),
        "min_load": min(share),
        "max_load": max(share),
        "capacity": capacity,
        "padding_ratio": 1.0 - dispatched / slots if slots else 0.0,
        "dropped_share": dropped / routed if routed else 0.0,
    }


def layer_rows(
    aux_list: list[RoutingAux],
    layer_stats: list[dict[str, torch.Tensor] | None],
    mask_T: torch.Tensor | None,
    world: int,
    device: torch.device,
) -> tuple[list[list[float]], list[dict[str, Any]]]:
    """(expert_load shares, expert_stats rows) per layer, summed over all ranks when distributed.

    layer_stats[l]: the expert-parallel layer's last ``{"capacity", "dispatched", "dropped", "routed"}``
    tensors, or None (replicated mode: no buffers, nothing dropped)."""
    rows = []
    for aux, st in zip(aux_list, layer_stats, strict=True):
        E = aux.probs_TE.shape[-1]
        c = expert_counts(aux.ids_TK, E, mask_T).to(device, torch.float64)
        if st is None:
            routed = float((aux.ids_TK >= 0).sum())
            extra = torch.tensor([routed, 0.0, routed], dtype=torch.float64, device=device)
        else:
            keys = ("dispatched", "dropped", "routed")
            extra = torch.stack([st[k].to(device, torch.float64) for k in keys])
        rows.append(torch.cat([c, extra]))
    flat = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.float64, device=device)
    caps = torch.tensor([float(st["capacity"]) if st else 0.0 for st in layer_stats], device=device)
    if world > 1:
        import deepspeed.comm as dist

        dist.all_reduce(flat)
        dist.all_reduce(caps, op=dist.ReduceOp.MAX)
    loads, stats, i = [], [], 0
    for aux, cap in zip(aux_list, caps.tolist(), strict=True):
        E = aux.probs_TE.shape[-1]
        v = flat[i : i + E + 3].tolist()
        i += E + 3
        counts, (dispatched, dropped, routed) = v[:E], v[E:]
        s = expert_stats(counts, int(cap) or None, world, dispatched, dropped, routed)
        loads.append([x / max(1.0, sum(counts)) for x in counts])
        stats.append(s)
    return loads, stats
