"""Backbone: a Llama-family decoder from ``transformers`` (local checkpoint or tiny random debug config),
truncated to L layers, frozen as MODEL.md specifies, with chosen FFNs swapped through a factory.

Any decoder whose layers are ``model.layers[i]`` with a SwiGLU ``mlp`` (gate_proj/up_proj/down_proj, act_fn)
works: LlamaModel, Qwen2Model, MistralModel, ... A causal-LM checkpoint is unwrapped to its base model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from nextlocmoe.config import BackboneConfig


def debug_llama_config(cfg: BackboneConfig):
    """A tiny LlamaConfig built in code (random init): the ``debug``/``mid`` flavours."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )


def _unwrap_decoder(model: nn.Module) -> nn.Module:
    """CausalLM -> its decoder (``.model``); check the layer/mlp structure we rely on."""
    dec = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model
    if not hasattr(dec, "layers") or not hasattr(dec, "embed_tokens"):
        raise ValueError(f"{type(model).__name__}: not a Llama-family decoder (no .layers / .embed_tokens)")
    mlp = dec.layers[0].mlp
    for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
        if not hasattr(mlp, name):
            raise ValueError(f"{type(model).__name__}: layer FFN has no {name}; a SwiGLU FFN is required")
    return dec


def load_backbone(cfg: BackboneConfig) -> tuple[nn.Module, object | None]:
    """Load (path) or build (debug) the decoder, truncated to ``cfg.num_layers``; returns (decoder, tokenizer
    or None). Loading never touches a hub: ``path`` must be a local folder with config + weights."""
    if cfg.path is None:
        from transformers import LlamaModel

        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            dec = LlamaModel(debug_llama_config(cfg))
        return _truncate_freeze(dec, cfg), None
    path = Path(cfg.path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.backbone.path={path}: no config.json (a local HF checkpoint folder)")
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    dec = _unwrap_decoder(model)
    tok = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _truncate_freeze(dec, cfg), tok


def _truncate_freeze(dec: nn.Module, cfg: BackboneConfig) -> nn.Module:
    n = len(dec.layers)
    if cfg.num_layers > n:
        raise ValueError(f"model.backbone.num_layers={cfg.num_layers} but the checkpoint has {n} layers")
    dec.layers = nn.ModuleList(list(dec.layers)[: cfg.num_layers])
    dec.config.num_hidden_layers = cfg.num_layers
    if hasattr(dec.config, "layer_types") and dec.config.layer_types is not None:
        dec.config.layer_types = dec.config.layer_types[: cfg.num_layers]
    if cfg.freeze:
        for p in dec.parameters():
            p.requires_grad_(False)
    return dec


def swap_ffns(dec: nn.Module, layers: list[int], factory: Callable[[nn.Module, int], nn.Module]) -> None:
    """Replace ``dec.layers[i].mlp`` by ``factory(old_mlp, i)`` for each i (the old FFN is passed in and
    becomes the shared frozen base of the new module)."""
    for i in layers:
        dec.layers[i].mlp = factory(dec.layers[i].mlp, i)


def prompt_token_ids(prompt: str, tokenizer, vocab_size: int) -> torch.Tensor:
    """Token ids of the task prompt: the backbone's tokenizer when it has one; for a random debug backbone
    (no tokenizer, no semantics) a byte-level id sequence (bytes mod vocab) - a fixed prefix, documented."""
    if tokenizer is not None:
        return tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return torch.tensor([b % vocab_size for b in prompt.encode()], dtype=torch.long)
