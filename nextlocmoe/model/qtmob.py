"""QT-Mob model parts (docs/QTMOB.md): code embeddings as an extra location input, the recovery mask
embedding, and the generative code head. Owned by ``NextLocMoE.qtmob`` (None unless ``model.tokens`` asks).

- Inputs: every record's location part (the first d_loc features of its d_rec embedding) gets
  ``proj(sum_l E_l[c_l(loc)])``, the codes looked up in-graph from ``hist_loc`` / ``cur_loc`` through the
  ``loc_codes`` buffer (padding -1 -> zero). Masked records (``cur_masked``) get a learned mask embedding
  as their whole location part instead.
- Head: s_0 = W h_last; level l logits = out_l(LayerNorm(s_0 + sum_{j<l} G_j[c_j])), so level l is
  conditioned on the code prefix; teacher forcing in training (cross-entropy per level), trie-constrained
  beam search at evaluation (nextlocmoe/model/trie.py).

Shape legend: B batch, N records, R d_rec, Lv code levels, K largest level size, D model width.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from nextlocmoe.config import ModelConfig
from nextlocmoe.model.trie import CodeTrie, beam_search


def load_codes(path: str | Path, num_locations: int | None = None) -> torch.Tensor:
    """location_codes.json -> [N, Lv] int64 (row = dense location id); checks completeness and uniqueness."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no location codes (run `nextlocmoe tokenize --data DIR` first)")
    raw = json.loads(path.read_text())
    n = len(raw) if num_locations is None else num_locations
    if sorted(int(k) for k in raw) != list(range(n)):
        raise ValueError(f"{path}: codes must cover location ids 0..{n - 1} exactly ({len(raw)} given)")
    codes = torch.tensor([raw[str(i)] for i in range(n)], dtype=torch.long)
    if len(torch.unique(codes, dim=0)) != n:
        raise ValueError(f"{path}: code tuples are not unique")
    return codes


class CodeHead(nn.Module):
    def __init__(self, d_model: int, sizes: list[int], d_code: int) -> None:
        super().__init__()
        self.sizes = sizes
        self.k = max(sizes)
        self.start = nn.Linear(d_model, d_code)
        self.prefix = nn.ModuleList(nn.Embedding(s, d_code) for s in sizes[:-1])
        self.norm = nn.LayerNorm(d_code)
        self.out = nn.ModuleList(nn.Linear(d_code, s) for s in sizes)

    def level_logits(self, lv: int, h_BD: torch.Tensor, prefix_BWl: torch.Tensor) -> torch.Tensor:
        """Logits of level ``lv`` given prefixes [B, W, lv] -> [B, W, K] (-inf past the level's size)."""
        s = self.start(h_BD).unsqueeze(1).expand(-1, prefix_BWl.shape[1], -1)
        for j in range(lv):
            s = s + self.prefix[j](prefix_BWl[..., j])
        logits = self.out[lv](self.norm(s))
        return nn.functional.pad(logits, (0, self.k - logits.shape[-1]), value=float("-inf"))

    def teacher_forced(self, h_BD: torch.Tensor, codes_BL: torch.Tensor) -> torch.Tensor:
        """[B, Lv, K] logits of every level given the true prefix."""
        pre = codes_BL.unsqueeze(1)
        return torch.cat([self.level_logits(lv, h_BD, pre[..., :lv]) for lv in range(len(self.sizes))], 1)


class QTMob(nn.Module):
    def __init__(self, cfg: ModelConfig, codes: torch.Tensor | None, d_model: int) -> None:
        """``codes`` [N, Lv]: every location's code tuple (``load_codes``; needed when model.tokens.enabled
        or gen_head, None otherwise). Construction reads no file."""
        super().__init__()
        tc, d_loc = cfg.tokens, cfg.embed.d_loc
        self.code_emb = self.head = self.mask_emb = None
        if tc.enabled or tc.gen_head:
            if codes is None:
                raise ValueError("model.tokens.enabled/gen_head need the location codes (load_codes)")
            self.register_buffer("loc_codes", codes, persistent=False)  # the codes file is the truth
            sizes = [int(s) for s in codes.max(0).values + 1]
            self.trie = CodeTrie(codes)
            d_code = tc.d_code or d_loc
            if tc.enabled:
                self.code_emb = nn.ModuleList(nn.Embedding(s, d_code) for s in sizes)
                for e in self.code_emb:
                    nn.init.normal_(e.weight, std=0.02)
                self.code_proj = nn.Identity() if d_code == d_loc else nn.Linear(d_code, d_loc, bias=False)
            if tc.gen_head:
                self.head = CodeHead(d_model, sizes, d_code)
        if tc.recovery:
            self.mask_emb = nn.Parameter(torch.randn(d_loc) * 0.02)
        self.d_loc = d_loc
        self.beam = tc.beam

    def codes_of(self, loc_BN: torch.Tensor) -> torch.Tensor:
        """Code ids [..., Lv] of location ids (-1 -> all -1)."""
        c = self.loc_codes[loc_BN.clamp_min(0)]
        return torch.where((loc_BN >= 0).unsqueeze(-1), c, -1)

    def inputs(
        self, rec_BNR: torch.Tensor, loc_BN: torch.Tensor, masked_BN: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Record embeddings with code embeddings added to (and masked records' replaced in) the location
        part."""
        loc_part, rest = rec_BNR[..., : self.d_loc], rec_BNR[..., self.d_loc :]
        if self.code_emb is not None:
            codes, valid = self.codes_of(loc_BN).clamp_min(0), (loc_BN >= 0).unsqueeze(-1)
            e = sum(emb(codes[..., i]) for i, emb in enumerate(self.code_emb))
            loc_part = loc_part + self.code_proj(e) * valid.to(loc_part.dtype)
        if masked_BN is not None and self.mask_emb is not None:
            loc_part = torch.where(masked_BN.unsqueeze(-1), self.mask_emb.to(loc_part.dtype), loc_part)
        return torch.cat([loc_part, rest], -1)

    def code_logits(self, h_BD: torch.Tensor, target_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits [B, Lv, K] and the target codes [B, Lv] (training loss only)."""
        codes = self.codes_of(target_B)
        return self.head.teacher_forced(h_BD, codes.clamp_min(0)), codes

    @torch.no_grad()
    def decode(self, h_BD: torch.Tensor, beam: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Trie-constrained beam search -> location ids [B, W] best first (-1 = none), scores [B, W]."""
        if self.trie.children.device != h_BD.device:
            self.trie.children = self.trie.children.to(h_BD.device)
            self.trie.leaf_loc = self.trie.leaf_loc.to(h_BD.device)
        loc, score, _ = beam_search(
            lambda lv, prefix: self.head.level_logits(lv, h_BD, prefix), self.trie, h_BD.shape[0],
            beam or self.beam,
        )  # fmt: skip
        return loc, score
