"""Building a NextLocMoE: the loading steps, kept apart from construction (which reads nothing).

- ``load_pretrained(cfg, info)``: the backbone (local HF checkpoint or the debug decoder built in code),
  the prompt ids, the text semantics (category / persona / time-slot descriptions through the configured
  text encoder) and, for QT-Mob, the location codes. The I/O of a fresh model.
- ``build_model(cfg, info)``: a fresh model for training = ``NextLocMoE(cfg, info, load_pretrained(...))``.
- ``rebuild_model(cfg, info)``: the model a checkpoint is loaded into. The text encoder never runs: its
  outputs live in the checkpoint (``persona_EP`` and ``prior_NE`` buffers, the semantic experts' weights),
  so zero placeholders of the right shape stand in until ``io.load_weights`` replaces them (and refuses a
  checkpoint that lacks them: ``TEXT_STATE``).

Shape legend: Es function experts, E persona experts, P text width, N visit-time slots.
"""

from __future__ import annotations

import torch

from nextlocmoe.config import ModelConfig
from nextlocmoe.model import text
from nextlocmoe.model.backbone import load_backbone, prompt_token_ids
from nextlocmoe.model.nextlocmoe import DataInfo, NextLocMoE, Pretrained
from nextlocmoe.model.qtmob import load_codes

MINILM_WIDTH = 384  # all-MiniLM-L6-v2 sentence embedding width (text.minilm_embed)
TEXT_STATE = (
    "router.persona_EP",
    "semantic.prior_NE",
)  # key suffixes a rebuilt model takes from a checkpoint


def _encoder(cfg: ModelConfig, tokenizer) -> str:
    if cfg.text_encoder == "auto":
        return "backbone" if tokenizer is not None else "minilm"
    return cfg.text_encoder


def load_pretrained(cfg: ModelConfig, info: DataInfo, texts: bool = True) -> Pretrained:
    """Load every part a model is built from. ``texts=False``: zero text placeholders (checkpoint rebuild:
    the text encoder is not run)."""
    decoder, tokenizer = load_backbone(cfg.backbone)
    emb = decoder.embed_tokens
    prompt_ids = prompt_token_ids(cfg.prompt, tokenizer, decoder.config.vocab_size)
    n_slots = len(text.time_slot_texts())
    wants_prior = cfg.semantic_moe.enabled and cfg.semantic_moe.time_prior > 0
    if texts:
        enc = _encoder(cfg, tokenizer)

        def embed(t: list[str]) -> torch.Tensor:
            return text.embed_texts(t, enc, tokenizer, emb)

        cat_EP, per_EP = embed(text.category_texts()), embed(text.persona_texts(cfg.personal_moe.num_experts))
        slot_NP = embed(text.time_slot_texts()) if wants_prior else None
    else:
        P = decoder.config.hidden_size if _encoder(cfg, tokenizer) == "backbone" else MINILM_WIDTH
        cat_EP = torch.zeros(len(text.category_texts()), P)
        per_EP = torch.zeros(cfg.personal_moe.num_experts, P)
        slot_NP = torch.zeros(n_slots, P) if wants_prior else None
    tk = cfg.tokens
    codes = load_codes(tk.codes_path, info.num_locations) if tk.enabled or tk.gen_head else None
    return Pretrained(decoder, prompt_ids, cat_EP, per_EP, slot_NP, codes)


def build_model(cfg: ModelConfig, info: DataInfo) -> NextLocMoE:
    """A fresh model for training: backbone weights and text semantics loaded, then constructed."""
    return NextLocMoE(cfg, info, load_pretrained(cfg, info))


def rebuild_model(cfg: ModelConfig, info: DataInfo, location_transfer: str | None = None) -> NextLocMoE:
    """The model a checkpoint is loaded into: the backbone is loaded (its frozen weights are not in
    checkpoints), the text encoder is not run (its outputs are)."""
    pre = load_pretrained(cfg, info, texts=False)
    pre.location_transfer = location_transfer
    return NextLocMoE(cfg, info, pre)
