"""Freeze a trained NextLocMoE into a graph-friendly inference module.

What freezing does (MODEL.md, docs/EXPORT.md, docs/ARCHITECTURE.md):
- every ``PersonalMoE`` stays itself and is put in inference form (``freeze_moe_layers``): its router's
  persona term ``W_p p_e`` becomes a constant (the router computes in fp32 whatever the engine's
  precision; selection is ``routing.select``: stable sort + cumsum + mask, static shapes, no host sync);
  its experts build the constants of a static-shape strategy (experts.py: ``masked`` = shared frozen base
  + one-hot-masked low-rank deltas, one fused input matmul; ``folded`` = W + s B A stacked over experts,
  dense over experts) and its dispatcher runs that strategy;
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
from torch import nn

from nextlocmoe.model.dispatch import LocalDispatcher
from nextlocmoe.model.experts import strategy_name
from nextlocmoe.model.personal_moe import PersonalMoE

EXPERT_COMPUTE = ("masked", "folded")  # experts.STRATEGIES with static shapes ("shared" = masked, older name)
DEFAULT_EXPERT_COMPUTE = "masked"  # measured faster on CPU at debug and mid sizes (docs/EXPORT.md)
OUTPUT_NAMES = ("pred_xy", "topk_ids", "topk_scores", "pred_dur")


def _const(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().contiguous()


def freeze_moe_layers(root: nn.Module, compute: str = DEFAULT_EXPERT_COMPUTE) -> int:
    """Put every ``PersonalMoE`` under ``root`` in inference form, in place: its router's persona term
    becomes a constant (``HistoryAwareRouter.freeze``), its experts build the ``compute`` strategy's
    constants (``PersonaExperts.freeze``) and its dispatcher runs that static-shape strategy. The layers
    stay the same class with the same router and routing record. Returns how many were frozen."""
    compute = strategy_name(compute)
    if compute not in EXPERT_COMPUTE:
        raise ValueError(f"expert compute must be one of {EXPERT_COMPUTE} (static shapes), got {compute!r}")
    layers = [m for m in root.modules() if isinstance(m, PersonalMoE)]
    for layer in layers:
        if layer.experts is None:
            raise ValueError("freeze a single-device model (io.load_run), not an expert-parallel one")
        layer.router.freeze()
        layer.experts.freeze(compute)
        layer.dispatcher = LocalDispatcher(compute)
    return len(layers)


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
        self,
        pred_xy_B2: torch.Tensor,
        scores_BL: torch.Tensor | None = None,
        cand_BC: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> topk_ids [B, K] int64, topk_scores [B, K] fp32 (descending). ``cand_BC``: the place ids of
        a retrieval head's scores [B, C] (model/retrieval.py; -1 entries score NEG and rank last)."""
        if self.mode == "scored":
            if scores_BL is None:
                raise ValueError("scored ranking needs the model's scored head")
            k = self.k if cand_BC is None else min(self.k, int(cand_BC.shape[1]))
            vals_BK, ids_BK = torch.topk(scores_BL.float(), k, dim=-1)
            if cand_BC is not None:
                ids_BK = cand_BC.gather(1, ids_BK)
            return ids_BK, vals_BK
        diff_BL2 = pred_xy_B2.float().unsqueeze(1) - self.loc_xy_L2.unsqueeze(0)
        neg_d2_BL = -(diff_BL2 * diff_BL2).sum(-1)
        vals_BK, ids_BK = torch.topk(neg_d2_BL, self.k, dim=-1)
        return ids_BK, -torch.sqrt(-vals_BK) * self.scale


class FrozenNextLocMoE(nn.Module):
    """Inference wrapper: positional input tensors (``input_names`` order) -> ``OUTPUT_NAMES`` tensors.

    ``model`` is any module with ``forward(batch: dict) -> (predictions with .xy/.dur/.scores, aux)``;
    its personalized MoEs are already frozen (``freeze_moe_layers``)."""

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
        ids_BK, scores_BK = self.ranker(preds.xy, preds.scores, getattr(preds, "cand", None))
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
    n = freeze_moe_layers(m, compute)
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
