"""Freeze a trained NextLocMoE into a graph-friendly inference module.

What freezing does (MODEL.md, docs/EXPORT.md):
- every ``PersonalMoE`` becomes a ``FrozenPersonalMoE``: router weights and the persona term
  ``W_p p_e`` are constants (buffers), the router computes in fp32 whatever the engine's precision, and
  selection is ``routing.select`` (stable sort + cumsum + mask: static shapes, no nonzero, no host sync);
- the LoRA experts run either as a shared frozen base + masked low-rank deltas (``SharedBaseExperts``, the
  math of ``PersonaExperts.forward_static`` on pre-stacked constants) or folded per expert
  (``FoldedExperts``: W + s B A stacked over experts, dense over experts, one matmul per projection);
- candidate ranking moves into the graph (``CandidateRanker``): the location table is a constant, squared
  distances (or the scored head's scores) + ``torch.topk``.

``FrozenNextLocMoE`` takes the model's input tensors positionally (``input_names`` order) and returns
``(pred_xy [B, 2] normalised, topk_ids [B, K] int64, topk_scores [B, K] fp32, pred_dur [B])``.

Shape legend: B batch, S sequence, T = B*S tokens, D model width, F FFN width, E experts, r LoRA rank,
K routing slots (in MoE layers) / ranked candidates (in the ranker), C history width, H router hidden,
L known locations.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from nextlocmoe.config import PersonalMoEConfig
from nextlocmoe.model.experts import PersonaExperts
from nextlocmoe.model.personal_moe import PersonalMoE
from nextlocmoe.model.routing import HistoryAwareRouter, RoutingAux, select

EXPERT_COMPUTE = ("shared", "folded")
DEFAULT_EXPERT_COMPUTE = "shared"  # measured faster on CPU at debug and mid sizes (docs/EXPORT.md)
OUTPUT_NAMES = ("pred_xy", "topk_ids", "topk_scores", "pred_dur")


def _const(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().contiguous()


class FrozenRouter(nn.Module):
    """``HistoryAwareRouter`` + selection with constant weights and the persona term precomputed; fp32
    always (its ONNX nodes are tagged for TensorRT: ``onnx_io.tag_fp32_nodes``).

    logit_e(t) = v . gelu(W_x x_t + b_x + W_h h_hist + (W_p p_e)); ``per_EH = W_p p_e`` is a constant.
    """

    def __init__(self, router: HistoryAwareRouter, cfg: PersonalMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        with torch.no_grad():
            self.register_buffer("w_x_HD", _const(router.w_x.weight.float()))
            self.register_buffer("b_x_H", _const(router.w_x.bias.float()))
            self.register_buffer("w_h_HC", _const(router.w_h.weight.float()))
            self.register_buffer("per_EH", _const(router.w_p(router.persona_EP.float()).float()))
            self.register_buffer("v_H", _const(router.v.weight[0].float()))
            # balancing bias (model/balance.py) as the constant selection scale exp(b), computed here by torch
            self.register_buffer("scale_E", _const(router.sel_bias_E.float().exp()))

    def forward(self, x_BSD: torch.Tensor, ctx_BC: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x_BSD token states, ctx_BC history vectors -> probs_TE [B*S, E], ids_TK, w_TK (fp32)."""
        B, S, D = x_BSD.shape
        tok_BSH = F.linear(x_BSD.float(), self.w_x_HD, self.b_x_H)
        tok_BSH = tok_BSH + F.linear(ctx_BC.float(), self.w_h_HC).unsqueeze(1)
        pre_TEH = F.gelu(tok_BSH.reshape(B * S, 1, -1) + self.per_EH.unsqueeze(0))
        probs_TE = torch.softmax(pre_TEH @ self.v_H, dim=-1)
        c = self.cfg
        ids_TK, w_TK = select(probs_TE, c.routing, c.top_k, c.tau, c.k_max, c.renormalize, self.scale_E)
        return probs_TE, ids_TK, w_TK


def _slot_mask_TKE(ids_TK: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot [T, K, E] of each slot's expert, all-zero for an empty slot (id -1)."""
    onehot = F.one_hot(ids_TK.clamp_min(0), num_experts).to(dtype)
    return onehot * (ids_TK >= 0).unsqueeze(-1).to(dtype)


class SharedBaseExperts(nn.Module):
    """Shared frozen base FFN + per-slot masked low-rank deltas (``forward_static``'s math, constants
    pre-stacked and the LoRA scale folded into B). One matmul gives the base gate/up and every expert's
    gate/up low-rank inputs; one batched matmul both deltas; the base down projection runs once per token.
    """

    def __init__(self, experts: PersonaExperts) -> None:
        super().__init__()
        base, s, E = experts.base, experts.scaling, experts.num_experts
        self.act = base.act_fn
        self.num_experts, self.rank = E, experts.lora[0].gate_A.shape[0]
        if any(getattr(m, "bias", None) is not None for m in (base.gate_proj, base.up_proj, base.down_proj)):
            raise ValueError("SharedBaseExperts expects a bias-free SwiGLU FFN (Llama family)")
        with torch.no_grad():
            a_in = torch.cat([experts.stacked("gate_A"), experts.stacked("up_A")]).flatten(0, 1)  # [2Er, D]
            w_in = torch.cat([base.gate_proj.weight, base.up_proj.weight, a_in])  # [2F + 2Er, D]
            self.register_buffer("w_in_XD", _const(w_in))
            b_gu = torch.stack([experts.stacked("gate_B"), experts.stacked("up_B")])  # [2, E, F, r]
            self.register_buffer("b_gu_2ErF", _const(s * b_gu.transpose(2, 3).flatten(1, 2)))
            self.register_buffer("w_d_DF", _const(base.down_proj.weight))
            self.register_buffer("a_d_ErF", _const(experts.stacked("down_A").flatten(0, 1)))
            self.register_buffer(
                "b_d_ErD", _const(s * experts.stacked("down_B").transpose(1, 2).flatten(0, 1))
            )

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """x_TD, ids_TK (-1 = empty slot), w_TK -> y_TD = sum_k w_k expert_{ids_k}(x)."""
        T, K = ids_TK.shape
        Fd, Er = self.w_d_DF.shape[1], self.a_d_ErF.shape[0]
        mask_TKE = _slot_mask_TKE(ids_TK, self.num_experts, x_TD.dtype)
        mask_TKEr = mask_TKE.repeat_interleave(self.rank, dim=-1)
        proj_TX = F.linear(x_TD, self.w_in_XD)
        g_TF, u_TF, a_T2Er = proj_TX[:, :Fd], proj_TX[:, Fd : 2 * Fd], proj_TX[:, 2 * Fd :]
        a_2TKEr = a_T2Er.view(T, 1, 2, Er).permute(2, 0, 1, 3) * mask_TKEr.unsqueeze(0)
        d_2TKF = (a_2TKEr.reshape(2, T * K, Er) @ self.b_gu_2ErF).view(2, T, K, Fd)
        h_TKF = self.act(g_TF.unsqueeze(1) + d_2TKF[0]) * (u_TF.unsqueeze(1) + d_2TKF[1])
        w_TK1 = w_TK.float().unsqueeze(-1)  # combine weights and the sum over experts in fp32 (precision.py)
        y_TD = F.linear((h_TKF.float() * w_TK1).sum(1).to(x_TD.dtype), self.w_d_DF).float()
        z_TKEr = F.linear(h_TKF, self.a_d_ErF).float() * (mask_TKEr.float() * w_TK1)
        return (y_TD + z_TKEr.sum(1) @ self.b_d_ErD.float()).to(x_TD.dtype)


class FoldedExperts(nn.Module):
    """LoRA folded into per-expert weights (W + s B A), stacked over experts and computed densely over all
    E experts: [T, D] @ [D, E*2F] -> act -> weighted by the dense combine weights -> [T, E*F] @ [E*F, D].
    No per-token weight gathers; cost ~E times one FFN (independent of the routing sparsity)."""

    def __init__(self, experts: PersonaExperts) -> None:
        super().__init__()
        base, s, E = experts.base, experts.scaling, experts.num_experts
        self.act, self.num_experts = base.act_fn, E
        with torch.no_grad():

            def fold(w_OI: torch.Tensor, a: str, b: str) -> torch.Tensor:  # -> [E, O, I]
                return w_OI.unsqueeze(0) + s * experts.stacked(b) @ experts.stacked(a)

            w_g = fold(base.gate_proj.weight, "gate_A", "gate_B")  # [E, F, D]
            w_u = fold(base.up_proj.weight, "up_A", "up_B")
            w_d = fold(base.down_proj.weight, "down_A", "down_B")  # [E, D, F]
            self.register_buffer("w_gu_XD", _const(torch.cat([w_g, w_u], 1).flatten(0, 1)))  # [E*2F, D]
            self.register_buffer("w_d_XD", _const(w_d.permute(0, 2, 1).flatten(0, 1)))  # [E*F, D]

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """x_TD, ids_TK (-1 = empty slot), w_TK -> y_TD."""
        T, E = x_TD.shape[0], self.num_experts
        c_TE = (_slot_mask_TKE(ids_TK, E, torch.float32) * w_TK.float().unsqueeze(-1)).sum(1)  # fp32
        gu_TE2F = F.linear(x_TD, self.w_gu_XD).view(T, E, 2, -1)
        h_TEF = (self.act(gu_TE2F[:, :, 0]) * gu_TE2F[:, :, 1]).float() * c_TE.unsqueeze(-1)
        return (h_TEF.reshape(T, -1) @ self.w_d_XD.float()).to(x_TD.dtype)  # sum over experts in fp32


class FrozenPersonalMoE(nn.Module):
    """Drop-in inference replacement of ``PersonalMoE`` (same ``bind(ctx, sink)`` / ``forward(x)`` API)."""

    def __init__(self, moe: PersonalMoE, compute: str = DEFAULT_EXPERT_COMPUTE) -> None:
        super().__init__()
        if compute not in EXPERT_COMPUTE:
            raise ValueError(f"expert compute must be one of {EXPERT_COMPUTE}, got {compute!r}")
        self.cfg, self.layer_idx, self.compute = moe.cfg, moe.layer_idx, compute
        self.router = FrozenRouter(moe.router, moe.cfg)
        self.experts = SharedBaseExperts(moe.experts) if compute == "shared" else FoldedExperts(moe.experts)
        self._ctx_BC: torch.Tensor | None = None
        self._sink: list[RoutingAux] | None = None

    def bind(self, ctx_BC: torch.Tensor, sink: list[RoutingAux]) -> None:
        """This forward's history vectors [B, C] and the list collecting its RoutingAux."""
        self._ctx_BC, self._sink = ctx_BC, sink

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if self._ctx_BC is None or self._sink is None:
            raise RuntimeError("FrozenPersonalMoE.bind(ctx, sink) must be called before each forward")
        B, S, D = x_BSD.shape
        probs_TE, ids_TK, w_TK = self.router(x_BSD, self._ctx_BC)
        y_TD = self.experts(x_BSD.reshape(B * S, D), ids_TK, w_TK)
        self._sink.append(RoutingAux(probs_TE, ids_TK, w_TK, probs_TE.new_zeros(()), B))
        return y_TD.view(B, S, D)


def swap_frozen_moes(root: nn.Module, compute: str = DEFAULT_EXPERT_COMPUTE) -> int:
    """Replace, in place, every ``PersonalMoE`` child anywhere under ``root`` by a ``FrozenPersonalMoE``.
    Returns how many were replaced."""
    n = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PersonalMoE):
                setattr(parent, name, FrozenPersonalMoE(child, compute))
                n += 1
    return n


class CandidateRanker(nn.Module):
    """In-graph top-K over the location table (a constant, normalised coords).

    ``point``: by distance to the predicted point; scores = -distance in metres (``scale`` = metres per
    normalised unit). ``scored``: by the scored head's scores [B, L]."""

    def __init__(self, loc_xy_L2: torch.Tensor, k: int, mode: str = "point", scale: float = 1.0) -> None:
        super().__init__()
        if mode not in ("point", "scored"):
            raise ValueError(f"ranking must be point|scored, got {mode!r}")
        self.register_buffer("loc_xy_L2", _const(loc_xy_L2.float()))
        self.k, self.mode, self.scale = min(int(k), int(loc_xy_L2.shape[0])), mode, float(scale)

    def forward(
        self, pred_xy_B2: torch.Tensor, scores_BL: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> topk_ids [B, K] int64, topk_scores [B, K] fp32 (descending)."""
        if self.mode == "scored":
            if scores_BL is None:
                raise ValueError("scored ranking needs the model's scored head")
            vals_BK, ids_BK = torch.topk(scores_BL.float(), self.k, dim=-1)
            return ids_BK, vals_BK
        diff_BL2 = pred_xy_B2.float().unsqueeze(1) - self.loc_xy_L2.unsqueeze(0)
        neg_d2_BL = -(diff_BL2 * diff_BL2).sum(-1)
        vals_BK, ids_BK = torch.topk(neg_d2_BL, self.k, dim=-1)
        return ids_BK, -torch.sqrt(-vals_BK) * self.scale


class FrozenNextLocMoE(nn.Module):
    """Inference wrapper: positional input tensors (``input_names`` order) -> ``OUTPUT_NAMES`` tensors.

    ``model`` is any module with ``forward(batch: dict) -> (predictions with .xy/.dur/.scores, aux)``;
    its personalized MoEs are already frozen (``swap_frozen_moes``)."""

    def __init__(self, model: nn.Module, ranker: CandidateRanker, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.ranker, self.input_names = model, ranker, tuple(input_names)
        self.output_names = OUTPUT_NAMES

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """inputs in ``input_names`` order -> (pred_xy [B, 2], topk_ids [B, K], topk_scores [B, K],
        pred_dur [B])."""
        if len(inputs) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        preds, _ = self.model(dict(zip(self.input_names, inputs, strict=True)))
        ids_BK, scores_BK = self.ranker(preds.xy, preds.scores)
        return preds.xy.float(), ids_BK, scores_BK, preds.dur.float()

    def run_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Convenience: a batch dict (extra keys ignored) -> {output name: tensor}."""
        outs = self(*(batch[k] for k in self.input_names))
        return dict(zip(self.output_names, outs, strict=True))


def freeze(
    model: nn.Module,
    loc_xy_L2: torch.Tensor,
    input_names: tuple[str, ...],
    *,
    compute: str = DEFAULT_EXPERT_COMPUTE,
    ranking: str = "point",
    k: int = 20,
    metres_per_unit: float = 1.0,
    copy_model: bool = True,
) -> FrozenNextLocMoE:
    """Trained model -> ``FrozenNextLocMoE`` in eval mode with no gradients.

    ``copy_model`` deep-copies first so the caller's eager model stays untouched (the parity reference);
    pass False for a backbone too large to hold twice (the frozen experts share the base FFN weights)."""
    m = copy.deepcopy(model) if copy_model else model
    m.eval().requires_grad_(False)
    n = swap_frozen_moes(m, compute)
    if n == 0:
        raise ValueError("no PersonalMoE layer found: nothing to freeze (is this a NextLocMoE model?)")
    ranker = CandidateRanker(loc_xy_L2, k, ranking, metres_per_unit)
    return FrozenNextLocMoE(m, ranker, input_names).eval()


def freeze_nextlocmoe(model: nn.Module, info, **kw) -> FrozenNextLocMoE:
    """``freeze`` for a ``nextlocmoe.model.nextlocmoe.NextLocMoE`` and its ``DataInfo``: location table,
    metres per unit and ranking (``model.cfg.heads.ranking``, point when there is no scored head) taken
    from the model/run."""
    ranking = kw.pop("ranking", None) or model.cfg.heads.ranking
    if ranking == "scored" and getattr(model, "scored", None) is None:
        ranking = "point"
    return freeze(
        model, info.loc_xy_norm, model.input_names, ranking=ranking, metres_per_unit=info.xy_std_m, **kw
    )
