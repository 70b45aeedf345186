"""Persona experts: one frozen SwiGLU FFN shared by all experts, plus one LoRA adapter per expert.

Expert e computes (NextLocMoE, personalized expert = FFN + LoRA_e; s = alpha / r):
    g = x W_g^T + s (x A_ge^T) B_ge^T,   u = x W_u^T + s (x A_ue^T) B_ue^T,   h = act(g) * u
    y_e = h W_d^T + s (h A_de^T) B_de^T
and the layer outputs sum_k w_k y_{e_k}. The LoRA tensors use PEFT's layout (A: [r, in], B: [out, r],
B zero at init, A Kaiming-uniform as PEFT does) and convert to/from PEFT adapters (see ``peft_io.py``).

Shared-base compute (MODEL.md): G = x W_g^T and U = x W_u^T once per token, the low-rank deltas and the
nonlinearity per (token, expert) pair, the prob-weighted hidden states summed per token and projected by
W_d once, plus each pair's low-rank down delta. Three implementations of the same math:
- ``naive``:   per expert, the full LoRA FFN on its routed tokens (the reference code's math).
- ``grouped``: shared base + per-expert low-rank matmuls on pairs sorted by expert (training path).
- ``static``:  shared base + one-hot-masked stacked low-rank matmuls, no data-dependent shapes (export).

Precision (issue 18, model/precision.py): the combine weights and the weighted sum over experts are fp32 in
every implementation (under bf16 parameters too); the result is cast to the activation dtype once.

Shape legend: T tokens, K slots, P used (token, slot) pairs, E experts, D model width, F FFN width, r rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn


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
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def num_experts(self) -> int:
        return len(self.lora)

    def stacked(self, name: str) -> torch.Tensor:
        """Stack one LoRA tensor over experts: e.g. 'gate_A' -> [E, r, D]."""
        return torch.stack([getattr(ex, name) for ex in self.lora])

    # -- reference -------------------------------------------------------------------------------------
    def forward_naive(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """Reference math: each selected expert's full LoRA FFN on its tokens, weighted and summed."""
        y_TD = torch.zeros_like(x_TD)
        for e, ex in enumerate(self.lora):
            t_idx, k_idx = torch.nonzero(ids_TK == e, as_tuple=True)
            if t_idx.numel() == 0:
                continue
            y = expert_ffn(self.base, ex, x_TD[t_idx], self.scaling, self.drop)
            y_TD = y_TD.index_add(0, t_idx, y * w_TK[t_idx, k_idx].unsqueeze(-1).to(y.dtype))
        return y_TD

    # -- shared base, grouped by expert (training) --------------------------------------------------------
    def forward_grouped(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """Shared-base compute over used pairs sorted by expert. Same result as ``forward_naive``."""
        T, K = ids_TK.shape
        base, s = self.base, self.scaling
        flat_e = ids_TK.reshape(-1)
        used = torch.nonzero(flat_e >= 0, as_tuple=True)[0]
        e_P, order = torch.sort(flat_e[used], stable=True)
        p_idx = used[order]
        t_P, w_P = p_idx // K, w_TK.reshape(-1)[p_idx].float()  # combine weights: fp32
        counts = torch.bincount(e_P, minlength=self.num_experts).tolist()  # host sync: training path only
        xd_TD = self.drop(x_TD)
        a_T2Er = xd_TD @ torch.cat([self.stacked("gate_A"), self.stacked("up_A")], 1).flatten(0, 1).t()
        # Gathers below use index_select (backward: index_add) rather than advanced indexing, whose
        # backward (index_put with accumulate) was ~15% of the layer's fwd+bwd on CPU.
        a_P2r = a_T2Er.view(T * self.num_experts, -1).index_select(0, t_P * self.num_experts + e_P)  # [P, 2r]
        r = a_P2r.shape[1] // 2
        dg, du = [], []
        for ex, chunk in zip(self.lora, torch.split(a_P2r, counts), strict=True):
            dg.append(chunk[:, :r] @ ex.gate_B.t())
            du.append(chunk[:, r:] @ ex.up_B.t())
        g_PF = base.gate_proj(x_TD).index_select(0, t_P) + s * torch.cat(dg)
        u_PF = base.up_proj(x_TD).index_select(0, t_P) + s * torch.cat(du)
        h_PF = base.act_fn(g_PF) * u_PF
        hw_TF = torch.zeros(T, h_PF.shape[1], dtype=torch.float32, device=h_PF.device)
        hw_TF = hw_TF.index_add(0, t_P, h_PF.float() * w_P.unsqueeze(-1))  # sum over experts in fp32
        y_TD = base.down_proj(hw_TF.to(x_TD.dtype)).float()
        hd_PF, zs = self.drop(h_PF), []
        for ex, h_chunk, w_chunk in zip(
            self.lora, torch.split(hd_PF, counts), torch.split(w_P, counts), strict=True
        ):
            zs.append(
                ((h_chunk @ ex.down_A.t()).float() * (s * w_chunk).unsqueeze(-1)) @ ex.down_B.t().float()
            )
        return y_TD.index_add(0, t_P, torch.cat(zs)).to(x_TD.dtype)  # cast once

    # -- shared base, static shapes (export) ------------------------------------------------------------
    def forward_static(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """Shared-base compute with no data-dependent shapes or host syncs: each slot's low-rank input is
        one-hot-masked into the stacked [E*r] space and multiplied by all experts' B at once."""
        T, K = ids_TK.shape
        E, base, s = self.num_experts, self.base, self.scaling
        valid_TK = (ids_TK >= 0).to(x_TD.dtype)
        mask_TKE = torch.nn.functional.one_hot(ids_TK.clamp_min(0), E).to(x_TD.dtype) * valid_TK.unsqueeze(-1)
        xd_TD = self.drop(x_TD)
        r = self.lora[0].gate_A.shape[0]

        def delta(a_name: str, b_name: str) -> torch.Tensor:  # [T, K, F]
            a_TEr = (xd_TD @ self.stacked(a_name).flatten(0, 1).t()).view(T, 1, E, r)
            a_TKEr = (a_TEr * mask_TKE.unsqueeze(-1)).flatten(2)
            b_ErF = self.stacked(b_name).transpose(1, 2).flatten(0, 1)  # [E*r, F]
            return a_TKEr @ b_ErF

        g_TKF = base.gate_proj(x_TD).unsqueeze(1) + s * delta("gate_A", "gate_B")
        u_TKF = base.up_proj(x_TD).unsqueeze(1) + s * delta("up_A", "up_B")
        h_TKF = base.act_fn(g_TKF) * u_TKF
        w_TK1 = (w_TK.float() * valid_TK.float()).unsqueeze(-1)  # fp32; empty slots: no output, no gradient
        y_TD = base.down_proj((h_TKF.float() * w_TK1).sum(1).to(x_TD.dtype)).float()
        z_TKEr = (self.drop(h_TKF) @ self.stacked("down_A").flatten(0, 1).t()).view(T, K, E, r)
        z_TEr = (z_TKEr.float() * (mask_TKE.float() * w_TK1 * s).unsqueeze(-1)).sum(1).flatten(1)
        z_TD = z_TEr @ self.stacked("down_B").transpose(1, 2).flatten(0, 1).float()
        return (y_TD + z_TD).to(x_TD.dtype)  # cast once

    def forward(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor, mode: str = "grouped"
    ) -> torch.Tensor:
        if mode == "grouped":
            return self.forward_grouped(x_TD, ids_TK, w_TK)
        if mode in ("static", "dense"):
            return self.forward_static(x_TD, ids_TK, w_TK)
        if mode == "naive":
            return self.forward_naive(x_TD, ids_TK, w_TK)
        raise ValueError(f"unknown expert compute mode {mode!r}")
