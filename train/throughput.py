"""Throughput a cluster user reads (metrics.jsonl): samples/s and tokens/s over the last log window with
checkpoint time excluded, the step time, and an MFU estimate.

Model FLOPs per token follow the usual convention (Kaplan et al. 2020; PaLM's MFU, Chowdhery et al. 2022):
training = 3 x forward (backward ~2 x forward), forward = 2 x the weights a token meets + attention's
2 x 2 x S x d per layer. The weights a token meets: every decoder layer's attention projections and FFN, in
a personalized MoE layer the shared base FFN once plus K LoRA adapters (K routing slots: top_k, or k_max
under threshold routing, an upper bound). The frozen backbone is counted as if trained (its weight
gradients are not computed), so MFU is the usual, comparable figure, not the hardware utilisation. Per
sample, the candidate scoring over the L known locations (2 x L x M) is spread over the sample's tokens.
MFU = achieved model FLOP/s / (world size x ``train.peak_tflops``); null when the peak is not given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from torch import nn


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of a ``NextLocMoE`` on sequences of ``seq_len`` tokens (module docstring)."""
    bc = model.decoder.config
    d, f, n = bc.hidden_size, bc.intermediate_size, bc.num_hidden_layers
    hd = getattr(bc, "head_dim", None) or d // bc.num_attention_heads
    attn = d * bc.num_attention_heads * hd * 2 + 2 * d * bc.num_key_value_heads * hd  # q, o, k, v
    pm = model.cfg.personal_moe
    lora = pm.lora_r * (2 * (d + f) + (f + d))  # gate, up (d -> f) and down (f -> d) adapters
    n_moe = len(model.cfg.moe_layers())
    weights = n * (attn + 3 * d * f) + n_moe * pm.slots * lora
    fwd = 2 * weights + n * 4 * seq_len * d
    scored = getattr(model, "scored", None)
    if scored is not None and hasattr(scored, "loc_emb"):
        w = scored.loc_emb.weight
        L, m = getattr(w, "ds_shape", w.shape)  # ZeRO-3 partitions the tensor; ds_shape is the full one
        fwd += 2 * L * m / seq_len
    return 3.0 * fwd


@dataclass
class Throughput:
    """Counters of one log window. ``samples`` are global (all ranks); checkpoint saves are excluded."""

    flops_per_token: float
    world: int
    peak_tflops: float = 0.0  # per device; 0 = unknown (mfu null)
    t0: float = field(default_factory=time.perf_counter)
    samples: int = 0
    tokens: int = 0
    steps: int = 0
    excluded_s: float = 0.0

    def step(self, samples: int, tokens: int) -> None:
        self.samples, self.tokens, self.steps = self.samples + samples, self.tokens + tokens, self.steps + 1

    def exclude(self, seconds: float) -> None:
        """Time spent outside training steps (a checkpoint save) is not part of the rates."""
        self.excluded_s += seconds

    def row(self) -> dict[str, float | None]:
        """The window's rates; starts the next window."""
        dt = max(time.perf_counter() - self.t0 - self.excluded_s, 1e-9)
        tok_s = self.tokens / dt
        mfu = None
        if self.peak_tflops > 0:
            mfu = tok_s * self.flops_per_token / (self.world * self.peak_tflops * 1e12)
        out = {
            "samples_per_s": self.samples / dt,
            "tokens_per_s": tok_s,
            "step_time_s": dt / max(self.steps, 1),
            "model_tflops_per_s": tok_s * self.flops_per_token / 1e12,
            "mfu": mfu,
        }
        self.t0, self.samples, self.tokens, self.steps, self.excluded_s = time.perf_counter(), 0, 0, 0, 0.0
        return out
