"""Persona experts: one frozen SwiGLU FFN shared by all experts, plus one LoRA adapter per expert.

Expert e computes (NextLocMoE, personalized expert = FFN + LoRA_e; s = alpha / r):
    g = x W_g^T + s (x A_ge^T) B_ge^T,   u = x W_u^T + s (x A_ue^T) B_ue^T,   h = act(g) * u
    y_e = h W_d^T + s (h A_de^T) B_de^T
and the layer outputs sum_k w_k y_{e_k}. The LoRA tensors use PEFT's layout (A: [r, in], B: [out, r],
B zero at init, A Kaiming-uniform as PEFT does) and convert to/from PEFT adapters (see ``peft_io.py``).

Shared-base compute (MODEL.md): G = x W_g^T and U = x W_u^T once per token, the low-rank deltas and the
nonlinearity per (token, expert) pair, the prob-weighted hidden states summed per token and projected by
W_d once, plus each pair's low-rank down delta. One vocabulary of compute strategies (``STRATEGIES``; the
config's ``personal_moe.compute``, the layer's dispatcher and ``export --expert-compute`` all use it):
- ``reference``: per expert, the full LoRA FFN on its routed tokens (the reference code's math; the
  expert-parallel layer runs it on each local expert's DeepSpeed capacity buffer).
- ``grouped``:   shared base + per-expert low-rank matmuls on pairs sorted by expert (training default;
  data-dependent split sizes, one host sync).
- ``masked``:    shared base + one-hot-masked stacked low-rank matmuls: no data-dependent shapes, no host
  sync (export default; trainable too). After ``freeze`` the base and low-rank input projections are one
  fused constant matmul.
- ``folded``:    LoRA folded into per-expert weights W + s B A, dense over all E experts (inference only:
  ``freeze("folded")`` builds the folded constants).
Every strategy ends in ``routing.combine`` (the one weighted sum over slots, fp32; model/precision.py);
the result is cast to the activation dtype once.

Shape legend: T tokens, K slots, P used (token, slot) pairs, E experts, D model width, F FFN width, r rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nextlocmoe.config import EXPERT_COMPUTE as STRATEGIES
from nextlocmoe.config import EXPERT_COMPUTE_ALIASES as _ALIASES
from nextlocmoe.model.routing import combine, combine_weights_TE, expert_counts


def strategy_name(name: str) -> str:
    """A compute strategy's name in the one vocabulary (older names accepted: dense/static/shared ->
    masked, naive -> reference); ValueError naming the choices otherwise."""
    name = _ALIASES.get(name, name)
    if name not in STRATEGIES:
        raise ValueError(f"unknown expert compute {name!r}: one of {STRATEGIES}")
    return name


def slot_mask_TKE(ids_TK: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot [T, K, E] of each slot's expert, all-zero for an empty slot (id -1)."""
    onehot = F.one_hot(ids_TK.clamp_min(0), num_experts).to(dtype)
    return onehot * (ids_TK >= 0).unsqueeze(-1).to(dtype)


class LoRAExpert(nn.Module):
    """One expert's LoRA tensors on gate/up/down projections (PEFT layout)."""

    def __init__(self, d_model: int, d_ff: int, r: int) -> None:
        super().__init__()
        self.gate_A = nn.Parameter(torch.empty(r, d_model))
        self.gate_B = nn.Parameter(torch.zeros(d_ff, r))
        self.up_A = nn.Parameter(torch.empty(r, d_model))
        self.up_B = nn.Parameter(torch.zeros(d_ff, r))
        self.down_A = nn.Parameter(torch.empty(r, d_ff))
        self.down_B = nn.Parameter(torch.zeros(d_model, r))

    def reset(self, seed: int) -> None:
        """PEFT's init (A ~ kaiming_uniform(a=sqrt(5)), B = 0), seeded per *global* expert id so that
        the same expert gets the same weights whatever the expert-parallel placement."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for a in (self.gate_A, self.up_A, self.down_A):
                bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) bound
                a.copy_(torch.rand(a.shape, generator=gen) * 2 * bound - bound)
            for b in (self.gate_B, self.up_B, self.down_B):
                b.zero_()


def expert_ffn(
    base: nn.Module, ex: LoRAExpert, x_ND: torch.Tensor, scaling: float, drop: nn.Module
) -> torch.Tensor:
    """Full LoRA FFN of one expert on N tokens: the reference math. x_ND [N, D] -> [N, D]."""
    xd = drop(x_ND)
    g = base.gate_proj(x_ND) + scaling * (xd @ ex.gate_A.t()) @ ex.gate_B.t()
    u = base.up_proj(x_ND) + scaling * (xd @ ex.up_A.t()) @ ex.up_B.t()
    h = base.act_fn(g) * u
    return base.down_proj(h) + scaling * (drop(h) @ ex.down_A.t()) @ ex.down_B.t()


class PersonaExperts(nn.Module):
    """E LoRA experts over one frozen base FFN (a HF ``LlamaMLP``-like module: gate/up/down_proj, act_fn).

    ``expert_ids`` are the global ids of the experts held here (all of them on a single device).
    ``forward(x_TD, ids_TK, w_TK, strategy)`` -> y_TD = sum_k w_k expert_{ids_k}(x) by any ``STRATEGIES``.
    """

    def __init__(
        self,
        base_mlp: nn.Module,
        r: int,
        alpha: float,
        dropout: float,
        expert_ids: list[int],
        seed: int,
    ) -> None:
        super().__init__()
        self.base = base_mlp
        d_model, d_ff = base_mlp.gate_proj.in_features, base_mlp.gate_proj.out_features
        self.expert_ids = list(expert_ids)
        self.lora = nn.ModuleList(LoRAExpert(d_model, d_ff, r) for _ in self.expert_ids)
        for ex, gid in zip(self.lora, self.expert_ids, strict=True):
            ex.reset(seed * 1_000_003 + gid)
        self.scaling = alpha / r
        self.rank = r
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.frozen: set[str] = set()  # strategies whose inference constants ``freeze`` built (buffers)

    @property
    def num_experts(self) -> int:
        return len(self.lora)

    def stacked(self, name: str) -> torch.Tensor:
        """Stack one LoRA tensor over experts: e.g. 'gate_A' -> [E, r, D]."""
        return torch.stack([getattr(ex, name) for ex in self.lora])

    def forward(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor, strategy: str = "grouped"
    ) -> torch.Tensor:
        """x_TD [T, D], ids_TK [T, K] (-1 = empty slot), w_TK [T, K] -> y_TD [T, D] (x's dtype)."""
        fn = {"grouped": self._grouped, "masked": self._masked, "folded": self._folded}.get(
            strategy_name(strategy), self._reference
        )
        return fn(x_TD, ids_TK, w_TK)

    # -- reference ---------------------------------------------------------------------------------------
    def _reference(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """Each selected expert's full LoRA FFN on its tokens, then the combine."""
        T, K = ids_TK.shape
        y_TKD = x_TD.new_zeros(T * K, x_TD.shape[1])
        for e, ex in enumerate(self.lora):
            t_idx, k_idx = torch.nonzero(ids_TK == e, as_tuple=True)
            if t_idx.numel():
                y = expert_ffn(self.base, ex, x_TD[t_idx], self.scaling, self.drop)
                y_TKD = y_TKD.index_copy(0, t_idx * K + k_idx, y)
        return combine(y_TKD.view(T, K, -1), w_TK).to(x_TD.dtype)

    # -- shared base, grouped by expert (training) --------------------------------------------------------
    def _grouped(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """Shared-base compute over used pairs sorted by expert (split sizes: ``routing.expert_counts``)."""
        T, K = ids_TK.shape
        E, base, s = self.num_experts, self.base, self.scaling
        flat_e = ids_TK.reshape(-1)
        used = torch.nonzero(flat_e >= 0, as_tuple=True)[0]
        e_P, order = torch.sort(flat_e[used], stable=True)
        p_idx = used[order]  # flat (token, slot) index of each pair, sorted by expert
        t_P = p_idx // K
        counts = expert_counts(ids_TK, E).long().tolist()  # host sync: the training path only
        a_T2Er = (
            self.drop(x_TD) @ torch.cat([self.stacked("gate_A"), self.stacked("up_A")], 1).flatten(0, 1).t()
        )
        # index_select (backward: index_add) rather than advanced indexing, whose backward (index_put with
        # accumulate) was ~15% of the layer's fwd+bwd on CPU.
        a_P2r = a_T2Er.view(T * E, -1).index_select(0, t_P * E + e_P)  # [P, 2r]
        r = self.rank
        dg, du = [], []
        for ex, chunk in zip(self.lora, torch.split(a_P2r, counts), strict=True):
            dg.append(chunk[:, :r] @ ex.gate_B.t())
            du.append(chunk[:, r:] @ ex.up_B.t())
        g_PF = base.gate_proj(x_TD).index_select(0, t_P) + s * torch.cat(dg)
        u_PF = base.up_proj(x_TD).index_select(0, t_P) + s * torch.cat(du)
        h_PF = base.act_fn(g_PF) * u_PF
        w_P = w_TK.reshape(-1).index_select(0, p_idx)
        y_TD = base.down_proj(combine(h_PF, w_P, t_P, T).to(x_TD.dtype)).float()
        zs = [
            s * (h @ ex.down_A.t()) @ ex.down_B.t()
            for ex, h in zip(self.lora, torch.split(self.drop(h_PF), counts), strict=True)
        ]
        return (y_TD + combine(torch.cat(zs), w_P, t_P, T)).to(x_TD.dtype)

    # -- shared base, static shapes ----------------------------------------------------------------------
    def _in_proj(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(G [T, F], U [T, F], low-rank gate/up inputs [T, 2, E*r]); one fused matmul once frozen."""
        T = x_TD.shape[0]
        if "masked" in self.frozen:
            proj_TX = F.linear(x_TD, self.w_in_XD)
            Fd = self.base.gate_proj.out_features
            return proj_TX[:, :Fd], proj_TX[:, Fd : 2 * Fd], proj_TX[:, 2 * Fd :].view(T, 2, -1)
        a_in = torch.cat([self.stacked("gate_A"), self.stacked("up_A")]).flatten(0, 1)  # [2Er, D]
        a_T2Er = F.linear(self.drop(x_TD), a_in).view(T, 2, -1)
        return self.base.gate_proj(x_TD), self.base.up_proj(x_TD), a_T2Er

    def _masked_consts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s B_gate/up [2, E*r, F], A_down [E*r, F], s B_down [E*r, D]): buffers once frozen."""
        if "masked" in self.frozen:
            return self.b_gu_2ErF, self.a_d_ErF, self.b_d_ErD
        s = self.scaling
        b_gu = torch.stack([self.stacked("gate_B"), self.stacked("up_B")])  # [2, E, F, r]
        return (
            s * b_gu.transpose(2, 3).flatten(1, 2),
            self.stacked("down_A").flatten(0, 1),
            s * self.stacked("down_B").transpose(1, 2).flatten(0, 1),
        )

    def _masked(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """Shared-base compute with no data-dependent shapes or host syncs: each slot's low-rank input is
        one-hot-masked into the stacked [E*r] space and multiplied by all experts' B at once."""
        T, K = ids_TK.shape
        w_TK = w_TK * (ids_TK >= 0).to(w_TK.dtype)  # an empty slot: no output, no gradient
        b_gu_2ErF, a_d_ErF, b_d_ErD = self._masked_consts()
        Er, Fd = a_d_ErF.shape
        mask_TKEr = slot_mask_TKE(ids_TK, self.num_experts, x_TD.dtype).repeat_interleave(self.rank, dim=-1)
        g_TF, u_TF, a_T2Er = self._in_proj(x_TD)
        a_2TKEr = a_T2Er.view(T, 1, 2, Er).permute(2, 0, 1, 3) * mask_TKEr.unsqueeze(0)
        d_2TKF = (a_2TKEr.reshape(2, T * K, Er) @ b_gu_2ErF).view(2, T, K, Fd)
        h_TKF = self.base.act_fn(g_TF.unsqueeze(1) + d_2TKF[0]) * (u_TF.unsqueeze(1) + d_2TKF[1])
        y_TD = self.base.down_proj(combine(h_TKF, w_TK).to(x_TD.dtype)).float()
        z_TKEr = F.linear(self.drop(h_TKF), a_d_ErF) * mask_TKEr
        return (y_TD + combine(z_TKEr, w_TK) @ b_d_ErD.float()).to(x_TD.dtype)

    # -- folded (inference) ------------------------------------------------------------------------------
    def _folded(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """Dense over all E experts with folded weights: [T, D] @ [D, E*2F] -> act -> per-expert down
        projection [T, E, D] -> combine with the dense [T, E] weights. No per-token gathers; cost ~E FFNs."""
        if "folded" not in self.frozen:
            raise RuntimeError("the folded expert compute needs freeze('folded') first (inference only)")
        T, E = x_TD.shape[0], self.num_experts
        gu_TE2F = F.linear(x_TD, self.w_gu_XD).view(T, E, 2, -1)
        h_TEF = self.base.act_fn(gu_TE2F[:, :, 0]) * gu_TE2F[:, :, 1]
        y_TED = torch.einsum("tef,edf->ted", h_TEF, self.w_d_EDF)
        return combine(y_TED, combine_weights_TE(ids_TK, w_TK, E)).to(x_TD.dtype)

    @torch.no_grad()
    def freeze(self, strategy: str) -> None:
        """Inference form for ``strategy`` (export): constants as buffers, built from the trained tensors.
        masked: the base gate/up and every expert's low-rank gate/up inputs in one [2F + 2Er, D] matrix and
        the pre-stacked, pre-scaled B; folded: W + s B A per expert, stacked."""
        strategy = strategy_name(strategy)
        base, s = self.base, self.scaling
        if strategy == "masked":
            if any(
                getattr(m, "bias", None) is not None for m in (base.gate_proj, base.up_proj, base.down_proj)
            ):
                raise ValueError("the masked inference form expects a bias-free SwiGLU FFN (Llama family)")
            consts = self._masked_consts()
            a_in = torch.cat([self.stacked("gate_A"), self.stacked("up_A")]).flatten(0, 1)
            w_in = torch.cat([base.gate_proj.weight, base.up_proj.weight, a_in])
            for name, t in zip(("w_in_XD", "b_gu_2ErF", "a_d_ErF", "b_d_ErD"), (w_in, *consts), strict=True):
                self.register_buffer(name, t.detach().clone().contiguous(), persistent=False)
        elif strategy == "folded":

            def fold(w_OI: torch.Tensor, a: str, b: str) -> torch.Tensor:  # -> [E, O, I]
                return w_OI.unsqueeze(0) + s * self.stacked(b) @ self.stacked(a)

            w_gu = torch.cat([fold(base.gate_proj.weight, "gate_A", "gate_B"),
                              fold(base.up_proj.weight, "up_A", "up_B")], 1)  # fmt: skip
            self.register_buffer("w_gu_XD", w_gu.flatten(0, 1).contiguous(), persistent=False)  # [E*2F, D]
            self.register_buffer("w_d_EDF", fold(base.down_proj.weight, "down_A", "down_B").contiguous(),
                                 persistent=False)  # fmt: skip
        self.frozen.add(strategy)
