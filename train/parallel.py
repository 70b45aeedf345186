"""DeepSpeed-MoE expert parallelism for the Personalized MoE layer (level 2): a dispatcher, not a layer.

``parallelize`` keeps every ``PersonalMoE`` (its router, its routing record) and swaps its dispatcher
(model/dispatch.py) for an ``ExpertParallelDispatcher``: a DeepSpeed ``MoE`` (so the engine finds it: expert
param groups, all-to-all, per-expert checkpoint files) holding this rank's LoRA experts. The layer routes
once (``HistoryAwareRouter.route``) and hands the selection to DeepSpeed as ``MOELayer``'s second input,
which DeepSpeed passes to its gate: ``SelectionGate`` turns the selection into DeepSpeed 0.19.8's
sparse-route 7-tuple (no routing math of its own; no token dropping unless ``capacity_factor`` > 0,
capacity = the largest per-expert token count agreed across the expert-parallel group, no noise, no RTS).
DeepSpeed then does the dispatch, the all-to-alls and the gate-weighted decode.

Each rank's experts run the ``reference`` per-expert math (experts.py ``expert_ffn``) on DeepSpeed's
capacity buffers (rows there are (token, expert) pairs already); the frozen base FFN is shared (one copy per
layer), registered as ``base_ffn`` (no "expert" in its parameter names: never in the per-expert files).

``train.moe_parallel=replicated`` (``replicate``): every rank keeps the local dispatcher, with the Switch
load-balancing loss, so ``loss.aux_weight`` means the same in both modes.

Checkpoints saved with any ep_size map back to single-device names (``gather_expert_state``).

Shape legend: T tokens, D model width, K slots, E experts, G ep_size, El = E / G local experts,
Cap capacity (max tokens any expert receives).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.comm import pg_utils
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from torch import nn

from nextlocmoe.model.dispatch import LocalDispatcher
from nextlocmoe.model.expert_ckpt import LORA_KEY, gather_deepspeed_state, local_lora_key, to_local_key
from nextlocmoe.model.experts import LoRAExpert, expert_ffn
from nextlocmoe.model.personal_moe import PersonalMoE
from nextlocmoe.model.routing import expert_counts, load_balancing_loss

ZERO3_MOE_ERROR = (
    "Native DeepSpeed MoE is not supported with ZeRO Stage 3 — use ZeRO-1/2 (train.zero_stage=1 or 2, "
    "ds_configs/zero1.json / zero2.json / zero2_offload.json) or train.moe_parallel=replicated (no "
    "DeepSpeed MoE layers); in expert mode the layers are DeepSpeed MoE layers at any ep_size, so "
    "ep_size=1 does not lift this."
)
Selection = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # probs_TE, ids_TK, w_TK (routing.py)


class SelectionGate(TopKGate):
    """DeepSpeed gate that receives the layer's routing selection as its second input (the ``used_token``
    slot of DeepSpeed's ``MOELayer`` call) and returns it as the sparse-route 7-tuple."""

    def __init__(self, num_experts: int, slots: int, d_model: int, capacity_factor: float = 0.0) -> None:
        super().__init__(d_model, num_experts, k=slots, min_capacity=0, noisy_gate_policy=None,
                         drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)  # fmt: skip
        del self.wg  # no DeepSpeed linear gate: the layer's HistoryAwareRouter routed already
        self.cap_factor = capacity_factor  # 0: no dropping (capacity = the largest expert load)
        self.stats: dict[str, torch.Tensor] = {}  # last forward's capacity / dispatched / dropped / routed

    def forward(self, input: torch.Tensor, selection: Selection, sparse_routes: bool = True,
                use_tutel: bool = False) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """input [T, D], selection (probs_TE, ids_TK, w_TK) -> (l_aux, capacity, E, indices [K, T] int32
        (-1 empty), locations [K, T] int32, gates [K, T] fp32, exp_counts [E])."""
        if not sparse_routes or use_tutel or not isinstance(selection, tuple):
            raise NotImplementedError("SelectionGate: sparse routes from a routing selection only")
        probs_TE, ids_TK, w_TK = selection
        return sparse_routes_from_selection(
            probs_TE, ids_TK, w_TK, self.ep_group, self.cap_factor, self.stats
        )


def sparse_routes_from_selection(
    probs_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    w_TK: torch.Tensor,
    ep_group: Any = None,
    capacity_factor: float = 0.0,
    stats: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Routing contract -> DeepSpeed's sparse-route 7-tuple.

    Location of (t, k) = number of earlier tokens routed to the same expert. capacity_factor 0: no token
    dropped, capacity = max over experts (and over the expert-parallel group) of the tokens an expert
    receives. capacity_factor c > 0: capacity = ceil(c * T * K / E) and pairs at locations >= capacity are
    dropped (index -1, gate 0: the token keeps its residual only for that slot). l_aux = E * sum_e
    mean_prob_e * frac_e (Switch/GShard, on the router's selection before dropping; 1.0 when balanced).
    ``stats`` (optional) receives capacity / dispatched / dropped / routed pair counts (0-dim tensors).
    """
    T, E = probs_TE.shape
    K = ids_TK.shape[1]
    used_TK = ids_TK >= 0
    safe_TK = ids_TK.clamp_min(0).long()
    mask_TE = torch.zeros(T, E, dtype=torch.long, device=ids_TK.device)
    mask_TE.scatter_add_(1, safe_TK, used_TK.long())  # ids of one token are distinct: 0/1 entries
    exp_counts = expert_counts(ids_TK, E).long()
    loc_TE = torch.cumsum(mask_TE, dim=0) - 1
    loc_TK = loc_TE.gather(1, safe_TK) * used_TK
    l_aux = load_balancing_loss(probs_TE, exp_counts)
    routed = used_TK.sum()
    if capacity_factor > 0:
        capacity = torch.full_like(exp_counts[0], max(1, math.ceil(capacity_factor * T * K / E)))
        used_TK = used_TK & (loc_TK < capacity)
        loc_TK = loc_TK * used_TK
    else:
        capacity = exp_counts.max().clone()
        if pg_utils.is_parallel(ep_group):
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=ep_group)
    if stats is not None:
        kept = used_TK.sum()
        stats.update(capacity=capacity.detach(), dispatched=kept, dropped=routed - kept, routed=routed)
    indices_KT = torch.where(used_TK, ids_TK, torch.full_like(ids_TK, -1)).t().contiguous().to(torch.int32)
    locations_KT = loc_TK.t().contiguous().to(torch.int32)
    gates_KT = (w_TK * used_TK).t().contiguous().float()
    return l_aux, capacity, E, indices_KT, locations_KT, gates_KT, exp_counts


def _hide(module: nn.Module) -> list[nn.Module]:
    """A reference that nn.Module does not register (no duplicate parameters / state-dict keys)."""
    return [module]


class LocalLoRAExperts(nn.Module):
    """This rank's LoRA experts over the layer's frozen base FFN (registered on the dispatcher, not here).

    Parameters live at ``deepspeed_experts.<local id>.{gate,up,down}_{A,B}`` (DeepSpeed's expert layout),
    tagged ``allreduce=False`` and ``group_name`` like ``deepspeed.moe.experts.Experts`` does.
    """

    def __init__(self, base_ffn: nn.Module, loras: list[LoRAExpert], scaling: float, dropout: float,
                 group_name: str) -> None:  # fmt: skip
        super().__init__()
        self._base = _hide(base_ffn)
        self.deepspeed_experts = nn.ModuleList(loras)
        self.scaling = scaling
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in self.deepspeed_experts.parameters():
            p.allreduce, p.group_name = False, group_name

    def forward(self, inputs_GECD: torch.Tensor) -> torch.Tensor:
        """inputs [G, El, Cap, D] (rows dispatched to this rank's experts) -> outputs, same shape."""
        G, El, Cap, D = inputs_GECD.shape
        outs = [
            expert_ffn(self._base[0], ex, inputs_GECD[:, i].reshape(G * Cap, D), self.scaling, self.drop)
            for i, ex in enumerate(self.deepspeed_experts)
        ]
        return torch.stack([o.view(G, Cap, D) for o in outs], dim=1)  # [G, El, Cap, D]


def expert_parallel_rank(ep_size: int) -> int:
    """This process's rank in its expert-parallel group (creates DeepSpeed's ``ep_size_<G>`` groups if
    needed; the engine then reuses them). Needs ``deepspeed.init_distributed()`` unless ep_size == 1."""
    if ep_size == 1 and not dist.is_initialized():
        return 0
    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs deepspeed.init_distributed() before parallelize()")
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_rank(name)


class ExpertParallelDispatcher(MoE):
    """The expert-parallel dispatcher of a ``PersonalMoE``: DeepSpeed-MoE all-to-all to this rank's LoRA
    experts (global ids ``ep_rank*El .. ep_rank*El + El - 1``) and back. Called like ``LocalDispatcher``;
    l_aux is the gate's Switch load-balancing loss for the local tokens."""

    def __init__(self, layer: PersonalMoE, ep_size: int, ep_rank: int, capacity_factor: float = 0.0) -> None:
        cfg, experts = layer.cfg, layer.experts
        d_model = experts.base.gate_proj.in_features
        super().__init__(d_model, nn.Identity(), num_experts=cfg.num_experts, ep_size=ep_size, k=1,
                         min_capacity=0, drop_tokens=False, use_rts=False,
                         top2_2nd_expert_sampling=False)  # fmt: skip
        self.ep_rank = ep_rank
        self.base_ffn = (
            experts.base
        )  # shared, frozen; outside deepspeed_experts.<i>, no "expert" in its names
        el = self.num_local_experts
        self.expert_ids = list(range(ep_rank * el, (ep_rank + 1) * el))
        loras = [experts.lora[g] for g in self.expert_ids]
        self.deepspeed_moe.experts = LocalLoRAExperts(
            experts.base, loras, experts.scaling, cfg.lora_dropout, self.expert_group_name
        )
        self.deepspeed_moe.gate = SelectionGate(cfg.num_experts, cfg.slots, d_model, capacity_factor)

    @property
    def last_stats(self) -> dict[str, torch.Tensor]:
        """The last forward's capacity / dispatched / dropped / routed pair counts (train/monitor.py)."""
        return self.deepspeed_moe.gate.stats

    def forward(  # type: ignore[override]
        self, x_TD: torch.Tensor, probs_TE: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor,
        experts: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """x_TD [T, D] and the layer's selection -> y_TD [T, D], l_aux (``experts`` unused: held here)."""
        y_TD = self.deepspeed_moe(x_TD, (probs_TE, ids_TK, w_TK))
        return y_TD, self.deepspeed_moe.l_aux.float()


def parallelize(model: nn.Module, ep_size: int, capacity_factor: float = 0.0) -> nn.Module:
    """Give every PersonalMoE an ExpertParallelDispatcher holding this rank's experts (in place; returns
    ``model``); the layer's single-device expert storage goes (the dispatcher owns the experts now).
    Call after ``deepspeed.init_distributed()`` and before ``deepspeed.initialize``."""
    for layer in [m for m in model.modules() if isinstance(m, PersonalMoE)]:
        if layer.cfg.num_experts % ep_size != 0:
            raise ValueError(f"num_experts {layer.cfg.num_experts} is not divisible by ep_size {ep_size}")
        layer.dispatcher = ExpertParallelDispatcher(
            layer, ep_size, expert_parallel_rank(ep_size), capacity_factor
        )
        layer.experts = None
    return model


def replicate(model: nn.Module) -> nn.Module:
    """``train.moe_parallel=replicated``: every rank keeps all experts (the local dispatcher and its
    strategy) and reports the Switch load-balancing loss as the expert-parallel gate does. In place."""
    for layer in [m for m in model.modules() if isinstance(m, PersonalMoE)]:
        layer.dispatcher = LocalDispatcher(layer.dispatcher.strategy, aux_loss=True)
    return model


def attach_expert_groups(model: nn.Module) -> nn.Module:
    """Give each ExpertParallelDispatcher its expert-parallel process group for use WITHOUT
    deepspeed.initialize (evaluation, tests). Not for a model passed to deepspeed.initialize (the engine
    does it)."""
    for m in model.modules():
        if isinstance(m, ExpertParallelDispatcher) and m.deepspeed_moe.ep_group is None and m.ep_size > 1:
            m.set_deepspeed_parallelism()
    return model


def model_has_moe(model: nn.Module) -> bool:
    """True if ``model`` holds a DeepSpeed MoE layer (the engine then needs MoE param groups)."""
    return any(isinstance(m, MoE) for m in model.modules())


def check_strategy(zero_stage: int, has_moe: bool) -> None:
    """Raise before deepspeed.initialize for combinations DeepSpeed refuses late or silently mishandles."""
    if has_moe and zero_stage == 3:
        raise ValueError(ZERO3_MOE_ERROR)


def moe_param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Param groups for a client torch.optim.AdamW: dense params + one group per expert group name
    (``moe: True``), trainable params only."""
    params = [p for p in model.parameters() if p.requires_grad]
    group = {"params": params, "name": "dense", "lr": lr, "weight_decay": weight_decay}
    return split_params_into_different_moe_groups_for_optimizer([group])


# ----------------------------------------------------------------------------------------------------------
# Checkpoint conversion (any ep_size -> single-device PersonalMoE names; LORA_KEY: expert_ckpt.py)


def gather_expert_state(ckpt_dir: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """Merge a DeepSpeed MoE checkpoint (``mp_rank_00_model_states.pt`` + per-expert files, saved with any
    ep_size) into one state dict with the single-device model's parameter names (PersonalMoE layout).
    The deepspeed-free implementation lives in ``nextlocmoe.model.expert_ckpt`` (evaluate / export)."""
    return gather_deepspeed_state(Path(ckpt_dir) / str(tag))


def _dispatchers(model: nn.Module) -> dict[str, ExpertParallelDispatcher]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertParallelDispatcher)}


def single_device_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters and buffers under single-device PersonalMoE names (local expert slots mapped to
    global expert ids). Merging the dicts of all ranks of one expert-parallel group gives the full model."""
    layers, out = _dispatchers(model), {}
    for key, value in model.state_dict().items():
        m = LORA_KEY.match(key)
        if m and m.group(1) in layers:
            key = local_lora_key(m.group(1), layers[m.group(1)].expert_ids[int(m.group(2))], m.group(3))
        out[to_local_key(key)] = value.detach().clone()
    return out


def scatter_expert_state(local_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Single-device state dict -> this rank's state dict for the parallelized ``model`` (any ep_size): the
    inverse of ``single_device_state``, for loading weights into an already-parallelized model (e.g. after
    ``deepspeed.initialize``). ``train.init_from`` does not need it: it loads before ``parallelize``."""
    layers, out = _dispatchers(model), {}
    for key in model.state_dict():
        m = LORA_KEY.match(key)
        if m and m.group(1) in layers:
            gid = layers[m.group(1)].expert_ids[int(m.group(2))]
            out[key] = local_state[local_lora_key(m.group(1), gid, m.group(3))]
        else:
            out[key] = local_state[to_local_key(key)]
    return out
