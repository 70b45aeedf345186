"""The loss, assembled in one place (MODEL.md "Heads and loss").

loss = mean Euclidean distance (metres) + lambda * mean personalized-router entropy
       (+ duration L1, + expert-parallel load-balancing aux, + candidate-scoring cross-entropy,
        + marginal-imbalance terms of both MoE levels and the function router's entropy: docs/EXPLAIN.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nextlocmoe.config import LossConfig
from nextlocmoe.model.nextlocmoe import ModelAux, Predictions


@dataclass
class LossParts:
    total: torch.Tensor
    distance_m: torch.Tensor
    entropy: torch.Tensor
    aux: torch.Tensor
    duration: torch.Tensor
    scored: torch.Tensor
    codes: torch.Tensor | None = None  # QT-Mob code head (mean per-level cross-entropy)
    balance: torch.Tensor | None = None  # persona routers' imbalance (layer mean, ModelAux.focus)
    semantic_balance: torch.Tensor | None = None  # function router's marginal imbalance
    semantic_entropy: torch.Tensor | None = None  # function router's mean per-record entropy

    def as_floats(self) -> dict[str, float]:
        """The logged keys of metrics.jsonl (CONTRACT.md)."""
        return {
            "loss": float(self.total.detach()),
            "loss_distance": float(self.distance_m.detach()),
            "loss_entropy": float(self.entropy.detach()),
            "loss_aux": float(self.aux.detach()),
            "loss_duration": float(self.duration.detach()),
            "loss_scored": float(self.scored.detach()),
            **({"loss_codes": float(self.codes.detach())} if self.codes is not None else {}),
            **{f"loss_{k}": float(v.detach()) for k, v in self.routing_terms().items()},
        }

    def routing_terms(self) -> dict[str, torch.Tensor]:
        names = ("balance", "semantic_balance", "semantic_entropy")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


def distance_m(pred_xy_B2: torch.Tensor, target_xy_B2: torch.Tensor, xy_std_m: float) -> torch.Tensor:
    """Per-sample Euclidean distance in metres between normalised points [B]."""
    d = (pred_xy_B2.float() - target_xy_B2.float()) * xy_std_m
    return torch.sqrt((d * d).sum(-1) + 1e-6)


def scored_nll(scores: torch.Tensor, cand_BC: torch.Tensor | None, target_B: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy [B] of the scored head: over every place (``cand_BC`` None, scores [B, L])
    or over the retrieved candidates [B, C] (model/retrieval.py: log-probabilities; a target outside its
    set, possible outside training, costs -log 1e-12, the mass the head gave it)."""
    if cand_BC is None:
        return torch.nn.functional.cross_entropy(scores.float(), target_B, reduction="none")
    hit_BC = cand_BC == target_B.unsqueeze(1)
    logp = torch.where(hit_BC, scores.float(), torch.zeros_like(scores, dtype=torch.float32)).sum(1)
    return -torch.where(hit_BC.any(1), logp, torch.full_like(logp, math.log(1e-12)))


def compute_loss(
    pred: Predictions, aux: ModelAux, batch: dict[str, torch.Tensor], cfg: LossConfig, xy_std_m: float
) -> LossParts:
    w = batch.get("sample_weight")  # recovery mixing (nextlocmoe/tokens/recovery.py): weighted sums

    def mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean() if w is None else (x * w.to(x.dtype)).sum()

    dist = mean(distance_m(pred.xy, batch["target_xy"], xy_std_m))
    zero = dist.new_zeros(())
    ent = torch.stack([a.entropy for a in aux.personal]).mean() if aux.personal else zero
    l_aux = torch.stack([a.l_aux.float() for a in aux.personal]).sum() if aux.personal else zero
    dur = mean((pred.dur.float() - batch["target_dur"].float()).abs())
    scored = zero
    if pred.scores is not None:
        scored = mean(scored_nll(pred.scores, pred.cand, batch["target_loc"]))
    codes = None
    if pred.code_logits is not None:
        B, Lv, K = pred.code_logits.shape
        ce = torch.nn.functional.cross_entropy(
            pred.code_logits.float().reshape(B * Lv, K), pred.code_targets.reshape(-1), reduction="none"
        )
        codes = mean(ce.view(B, Lv).mean(1))
    total = (
        dist + cfg.entropy_weight * ent + cfg.aux_weight * l_aux + cfg.duration_weight * dur
        + cfg.scored_weight * scored
    )  # fmt: skip
    if codes is not None:
        total = total + cfg.codes_weight * codes
    focus = aux.balanced()  # per current-window position across the batch, or all tokens pooled
    bal_of = (lambda a: a.position_balance) if aux.focus else (lambda a: a.balance)
    bal = torch.stack([bal_of(a) for a in focus]).mean() if focus else zero
    sem = aux.semantic
    sem_bal = sem.balance if sem is not None else zero
    sem_ent = sem.entropy if sem is not None else zero
    total = total + cfg.balance_weight * bal + cfg.semantic_balance_weight * sem_bal
    total = total + cfg.semantic_entropy_weight * sem_ent
    return LossParts(total, dist, ent, l_aux, dur, scored, codes, bal, sem_bal, sem_ent)
