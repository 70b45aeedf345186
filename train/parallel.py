"""DeepSpeed-MoE expert parallelism for the Personalized MoE layer (level 2).

``DSPersonalMoE`` is a drop-in replacement for ``nextlocmoe.model.personal_moe.PersonalMoE`` built on
DeepSpeed's native ``MoE`` (so the engine finds it: expert param groups, all-to-all, per-expert checkpoint
files). Inside it:

- ``HistoryAwareGate`` (a ``TopKGate``): our ``HistoryAwareRouter`` on [x_t ; h_hist] and ``routing.select``
  (top-k or threshold), returned in DeepSpeed 0.19.8's sparse-route 7-tuple. No token dropping (capacity =
  the largest per-expert token count, agreed across the expert-parallel group), no noise, no RTS.
- ``SharedBaseLoRAExperts``: this rank's LoRA experts only; the frozen base FFN is shared (one copy per
  layer), lives on the MoE module as ``base_ffn`` (outside ``deepspeed_experts.<i>``, no "expert" in its
  parameter names) and is never saved into the per-expert files.

Checkpoints saved with any ep_size are mapped back to single-device ``PersonalMoE`` names by
``gather_expert_state`` (evaluate / export; training under another ep_size starts from them through
``train.init_from``, which loads the single-device model before ``parallelize``).

Shape legend: B batch, S sequence, T = B*S tokens, D model width, C history width, K slots, E experts,
G ep_size, El = E / G local experts, Cap capacity (max tokens any expert receives), F FFN width.
"""

from __future__ import annotations

import copy
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

from nextlocmoe.config import PersonalMoEConfig
from nextlocmoe.model.expert_ckpt import LORA_KEY, gather_deepspeed_state, to_local_key
from nextlocmoe.model.experts import LoRAExpert, expert_ffn
from nextlocmoe.model.personal_moe import PersonalMoE
from nextlocmoe.model.routing import HistoryAwareRouter, RoutingAux, select

ZERO3_MOE_ERROR = (
    "Native DeepSpeed MoE is not supported with ZeRO Stage 3 — use ZeRO-1/2 (train.zero_stage=1 or 2, "
    "ds_configs/zero1.json / zero2.json / zero2_offload.json) or train.moe_parallel=replicated (no "
    "DeepSpeed MoE layers); in expert mode the layers are DeepSpeed MoE layers at any ep_size, so "
    "ep_size=1 does not lift this."
)


# ----------------------------------------------------------------------------------------------------------
# Gate


class HistoryAwareGate(TopKGate):
    """DeepSpeed gate running our history-aware router and top-k / threshold selection.

    ``context`` ([T, C], the history vector per token) must be set right before each forward. The last
    forward's routing (probs_TE, ids_TK, w_TK) is kept in ``last`` for the layer's RoutingAux.
    """

    def __init__(
        self, router: HistoryAwareRouter, cfg: PersonalMoEConfig, d_model: int, capacity_factor: float = 0.0
    ) -> None:
        super().__init__(
            d_model,
            cfg.num_experts,
            k=cfg.slots,
            min_capacity=0,
            noisy_gate_policy=None,
            drop_tokens=False,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        del self.wg  # DeepSpeed's linear gate is replaced by the history-aware router
        self.router = router
        self.cfg = cfg
        self.context: torch.Tensor | None = None
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.cap_factor = capacity_factor  # 0: no dropping (capacity = the largest expert load)
        self.stats: dict[str, torch.Tensor] = {}  # last forward's capacity / dispatched / dropped / routed

    def forward(
        self,
        input: torch.Tensor,
        used_token: torch.Tensor | None = None,
        sparse_routes: bool = True,
        use_tutel: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """input [T, D] -> (l_aux, capacity, E, indices [K, T] int32 (-1 empty), locations [K, T] int32,
        gates [K, T] fp32, exp_counts [E]): DeepSpeed 0.19.8's sparse-route gate contract."""
        if not sparse_routes or use_tutel or used_token is not None:
            raise NotImplementedError("HistoryAwareGate: sparse routes only (no tutel, no used_token)")
        if self.context is None or self.context.shape[0] != input.shape[0]:
            raise RuntimeError("HistoryAwareGate.context [T, C] must be set for this forward's tokens")
        c = self.cfg
        probs_TE = self._router_fp32(input, self.context)
        scale = self.router.sel_bias_E.float().exp()  # balancing bias (model/balance.py)
        ids_TK, w_TK = select(probs_TE, c.routing, c.top_k, c.tau, c.k_max, c.renormalize, scale)
        self.last = (probs_TE, ids_TK, w_TK)
        cf, st = self.cap_factor, self.stats
        return sparse_routes_from_selection(probs_TE, ids_TK, w_TK, self.ep_group, cf, st)

    def _router_fp32(self, x_TD: torch.Tensor, ctx_TC: torch.Tensor) -> torch.Tensor:
        """The router with fp32 weights even when the engine cast the module to bf16 (bf16 routers flip
        expert choices; HistoryAwareRouter casts its inputs, not its weights). No copy when already fp32;
        gradients flow back to the (bf16) parameters through the casts."""
        tensors = dict(self.router.named_parameters())
        tensors.update(self.router.named_buffers())
        if all(t.dtype == torch.float32 for t in tensors.values()):
            return self.router(x_TD, ctx_TC)
        fp32 = {k: t.float() for k, t in tensors.items()}
        return torch.func.functional_call(self.router, fp32, (x_TD, ctx_TC))


def load_balancing_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load-balancing loss E * sum_e mean_t(p_te) * frac_e, frac_e = counts_E / sum(counts_E)
    (share of used (token, slot) pairs on expert e, no gradient). 1.0 when perfectly balanced."""
    E = probs_TE.shape[-1]
    frac_E = counts_E.detach().float() / counts_E.sum().clamp_min(1).float()
    return E * torch.sum(probs_TE.float().mean(0) * frac_E)


def expert_counts(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Used (token, slot) pairs per expert, [E] int64 (-1 slots ignored)."""
    ids = ids_TK.detach()
    return torch.bincount(ids[ids >= 0].long(), minlength=num_experts)


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
    exp_counts = mask_TE.sum(0).detach()
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


# ----------------------------------------------------------------------------------------------------------
# Experts


def _hide(module: nn.Module) -> list[nn.Module]:
    """A reference that nn.Module does not register (no duplicate parameters / state-dict keys)."""
    return [module]


class SharedBaseLoRAExperts(nn.Module):
    """This rank's LoRA experts over a frozen base FFN shared with the owning layer (not registered here).

    Parameters live at ``deepspeed_experts.<local id>.{gate,up,down}_{A,B}`` (DeepSpeed's expert layout),
    tagged ``allreduce=False`` and ``group_name`` like ``deepspeed.moe.experts.Experts`` does.
    """

    def __init__(
        self, base_ffn: nn.Module, loras: list[LoRAExpert], scaling: float, dropout: float, group_name: str
    ) -> None:
        super().__init__()
        self._base = _hide(base_ffn)
        self.deepspeed_experts = nn.ModuleList(loras)
        self.num_local_experts = len(loras)
        self.scaling = scaling
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for ex in self.deepspeed_experts:
            for p in ex.parameters():
                p.allreduce = False
                p.group_name = group_name

    def forward(self, inputs_GECM: torch.Tensor) -> torch.Tensor:
        """inputs [G, El, Cap, D] (tokens dispatched to this rank's experts) -> outputs, same shape."""
        G, El, Cap, D = inputs_GECM.shape
        outs = []
        for i, ex in enumerate(self.deepspeed_experts):
            x_ND = inputs_GECM[:, i].reshape(G * Cap, D)
            outs.append(expert_ffn(self._base[0], ex, x_ND, self.scaling, self.drop).view(G, Cap, D))
        return torch.stack(outs, dim=1)


# ----------------------------------------------------------------------------------------------------------
# The layer


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


class DSPersonalMoE(MoE):
    """Expert-parallel PersonalMoE: same ``bind(ctx_BC, sink)`` / ``forward(x_BSD) -> y_BSD`` API.

    Holds the router (in the gate), the shared frozen base FFN (``base_ffn``) and the LoRA tensors of global
    experts ``ep_rank*El .. ep_rank*El + El - 1``. Appends RoutingAux(probs_TE, ids_TK, w_TK, l_aux) per
    forward, where l_aux is the gate's load-balancing loss for the local tokens.
    """

    def __init__(self, layer: PersonalMoE, ep_size: int, ep_rank: int, capacity_factor: float = 0.0) -> None:
        cfg = layer.cfg
        base = layer.experts.base
        d_model = base.gate_proj.in_features
        super().__init__(
            d_model,
            nn.Identity(),
            num_experts=cfg.num_experts,
            ep_size=ep_size,
            k=1,
            min_capacity=0,
            drop_tokens=False,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        self.cfg = cfg
        self.layer_idx = layer.layer_idx
        self.ep_rank = ep_rank
        self.base_ffn = base  # shared, frozen; outside deepspeed_experts.<i>, no "expert" in its names
        el = self.num_local_experts
        self.expert_ids = list(range(ep_rank * el, (ep_rank + 1) * el))
        loras = [copy.deepcopy(layer.experts.lora[g]) for g in self.expert_ids]
        self.deepspeed_moe.experts = SharedBaseLoRAExperts(
            base, loras, layer.experts.scaling, cfg.lora_dropout, self.expert_group_name
        )
        gate = HistoryAwareGate(copy.deepcopy(layer.router), cfg, d_model, capacity_factor)
        self.deepspeed_moe.gate = gate
        self._ctx_BC: torch.Tensor | None = None
        self._sink: list[RoutingAux] | None = None

    @classmethod
    def from_local(cls, layer: PersonalMoE, ep_size: int, capacity_factor: float = 0.0) -> DSPersonalMoE:
        """Build from a single-device PersonalMoE: copies the router and this rank's experts' LoRA tensors
        (the frozen base module is shared, not copied)."""
        if layer.cfg.num_experts % ep_size != 0:
            raise ValueError(f"num_experts {layer.cfg.num_experts} is not divisible by ep_size {ep_size}")
        return cls(layer, ep_size, expert_parallel_rank(ep_size), capacity_factor)

    @property
    def last_stats(self) -> dict[str, torch.Tensor]:
        """The last forward's capacity / dispatched / dropped / routed pair counts (train/monitor.py)."""
        return self.deepspeed_moe.gate.stats

    @property
    def router(self) -> HistoryAwareRouter:
        return self.deepspeed_moe.gate.router

    def bind(self, ctx_BC: torch.Tensor, sink: list[RoutingAux]) -> None:
        """Set this forward's history vectors [B, C] and the list that collects its RoutingAux."""
        self._ctx_BC, self._sink = ctx_BC, sink

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x_BSD [B, S, D] -> y_BSD [B, S, D]; appends this layer's RoutingAux to the bound sink."""
        if self._ctx_BC is None or self._sink is None:
            raise RuntimeError("DSPersonalMoE.bind(ctx, sink) must be called before each forward")
        S = x_BSD.shape[1]
        gate = self.deepspeed_moe.gate
        gate.context = self._ctx_BC.repeat_interleave(S, dim=0)
        y_BSD, l_aux, _ = super().forward(x_BSD)
        probs_TE, ids_TK, w_TK = gate.last
        gate.context, gate.last = None, None
        self._sink.append(RoutingAux(probs_TE, ids_TK, w_TK, l_aux.float(), x_BSD.shape[0]))
        return y_BSD


# ----------------------------------------------------------------------------------------------------------
# Model-level helpers


def parallelize(model: nn.Module, ep_size: int, capacity_factor: float = 0.0) -> nn.Module:
    """Replace every PersonalMoE submodule by a DSPersonalMoE (in place; returns ``model``).

    Call after ``deepspeed.init_distributed()`` and before ``deepspeed.initialize``.
    """
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, PersonalMoE)]
    for name, layer in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, DSPersonalMoE.from_local(layer, ep_size, capacity_factor))
    return model


def attach_expert_groups(model: nn.Module) -> nn.Module:
    """Give each DSPersonalMoE its expert-parallel process group for use WITHOUT deepspeed.initialize
    (evaluation, tests). Do not call on a model you pass to deepspeed.initialize (the engine does it)."""
    for m in model.modules():
        if isinstance(m, DSPersonalMoE) and m.deepspeed_moe.ep_group is None and m.ep_size > 1:
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


def expert_load(aux_list: list[RoutingAux], group: Any = None, reduce: bool = False) -> list[list[float]]:
    """Per MoE layer, the fraction of used (token, slot) pairs routed to each expert. With ``reduce`` the
    counts are summed over ``group`` (default: all ranks) first, giving the global load."""
    out = []
    for aux in aux_list:
        counts_E = expert_counts(aux.ids_TK, aux.probs_TE.shape[-1]).float()
        if reduce and dist.is_initialized():
            dist.all_reduce(counts_E, group=group)
        out.append((counts_E / counts_E.sum().clamp_min(1.0)).tolist())
    return out


# ----------------------------------------------------------------------------------------------------------
# Checkpoint conversion (any ep_size -> single-device PersonalMoE names)

# LORA_KEY (expert_ckpt.py): the DSPersonalMoE LoRA key layout (local slot index in this module's state dict;
# global expert id in DeepSpeed's expert files).


def gather_expert_state(ckpt_dir: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """Merge a DeepSpeed MoE checkpoint (``mp_rank_00_model_states.pt`` + per-expert files, saved with any
    ep_size) into one state dict with the single-device model's parameter names (PersonalMoE layout).
    The deepspeed-free implementation lives in ``nextlocmoe.model.expert_ckpt`` (evaluate / export)."""
    return gather_deepspeed_state(Path(ckpt_dir) / str(tag))


def single_device_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters and buffers under single-device PersonalMoE names (local expert slots mapped to
    global expert ids). Merging the dicts of all ranks of one expert-parallel group gives the full model."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DSPersonalMoE)}
    out = {}
    for key, value in model.state_dict().items():
        m = LORA_KEY.match(key)
        if m and m.group(1) in layers:
            gid = layers[m.group(1)].expert_ids[int(m.group(2))]
            key = f"{m.group(1)}.deepspeed_moe.experts.deepspeed_experts.{gid}.{m.group(3)}"
        out[to_local_key(key)] = value.detach().clone()
    return out


def scatter_expert_state(local_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Single-device state dict -> this rank's DSPersonalMoE state dict for ``model`` (any ep_size): the
    inverse of ``single_device_state``, for loading weights into an already-parallelized model (e.g. after
    ``deepspeed.initialize``). ``train.init_from`` does not need it: it loads before ``parallelize``."""
    out = {}
    own = model.state_dict()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DSPersonalMoE)}
    for key in own:
        m = LORA_KEY.match(key)
        if m and m.group(1) in layers:
            gid = layers[m.group(1)].expert_ids[int(m.group(2))]
            out[key] = local_state[f"{m.group(1)}.experts.lora.{gid}.{m.group(3)}"]
        else:
            out[key] = local_state[to_local_key(key)]
    return out


# ----------------------------------------------------------------------------------------------------------
# Replicated mode (train.moe_parallel=replicated): the single-device PersonalMoE on every rank


def fill_balancing_loss(aux_list: list[RoutingAux]) -> None:
    """Give each layer's RoutingAux the same load-balancing l_aux the expert-parallel gate computes (on
    this rank's tokens), so ``loss_aux`` / ``loss.aux_weight`` mean the same in both modes. In place."""
    for a in aux_list:
        a.l_aux = load_balancing_loss(a.probs_TE, expert_counts(a.ids_TK, a.probs_TE.shape[-1]))
