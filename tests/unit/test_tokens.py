"""QT-Mob location tokens: unique codes, determinism, the trie never emits an invalid tuple, model wiring."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

from nextlocmoe.config import Config, ConfigError, load_config
from nextlocmoe.model.build import build_model
from nextlocmoe.model.loss import compute_loss
from nextlocmoe.model.nextlocmoe import DataInfo
from nextlocmoe.model.trie import CodeTrie, beam_ranks, beam_search
from nextlocmoe.tokens.rqvae import (
    TokenizerSettings,
    add_collision_level,
    load_codes,
    sinkhorn_assign,
    tokenize,
    train_tokenizer,
)
from tests.unit.conftest import ROOT, random_batch

L = 50
FAST = dict(levels=2, codebook=4, d_code=8, hidden=16, epochs=3, batch_size=64, kmeans_iters=2)


def test_tokenize_gives_every_location_a_unique_code(prepared_fsq) -> None:
    rep = tokenize(prepared_fsq, TokenizerSettings(**FAST))
    codes = json.loads((prepared_fsq / "location_codes.json").read_text())
    n = json.loads((prepared_fsq / "manifest.json").read_text())["locations"]
    assert sorted(int(k) for k in codes) == list(range(n)) == list(range(rep["locations"]))
    tuples = [tuple(v) for v in codes.values()]
    assert len(set(tuples)) == n and all(len(t) == rep["levels"] for t in tuples)
    saved = json.loads((prepared_fsq / "tokenizer_report.json").read_text())
    for k in ("locations", "levels", "codebook", "collisions_resolved", "code_usage"):
        assert saved[k] == rep[k]
    assert len(rep["code_usage"]) == rep["levels"] and rep["codebook"] == 4
    assert load_codes(prepared_fsq / "location_codes.json", n).shape == (n, rep["levels"])


def test_collisions_get_an_extra_level() -> None:
    rq = np.array([[0, 1], [2, 3], [0, 1], [0, 1], [2, 3], [1, 1]])
    codes, info = add_collision_level(rq)
    assert codes.shape == (6, 3) and len(np.unique(codes, axis=0)) == 6
    assert codes[:, 2].tolist() == [0, 0, 1, 2, 1, 0]  # index inside the colliding group, id order
    assert info["collisions_resolved"] == 5 and info["colliding_groups"] == 2
    same, info = add_collision_level(np.array([[0, 1], [1, 0]]))
    assert same.shape == (2, 2) and info["collisions_resolved"] == 0


def test_identical_features_still_get_unique_codes() -> None:
    x = np.repeat(np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32), 8, axis=0)  # 40 rows
    codes, info = train_tokenizer(x, TokenizerSettings(**FAST))
    assert len(np.unique(codes, axis=0)) == 40 and info["extra_level"]


def test_tokenizer_is_deterministic_under_a_seed() -> None:
    x = np.random.default_rng(1).normal(size=(120, 10)).astype(np.float32)
    a, ia = train_tokenizer(x, TokenizerSettings(**FAST, seed=3))
    b, ib = train_tokenizer(x, TokenizerSettings(**FAST, seed=3))
    assert np.array_equal(a, b) and ia["recon_mse"] == ib["recon_mse"]


def test_sinkhorn_balances_the_last_level() -> None:
    g = torch.Generator().manual_seed(0)
    ang = torch.arange(8.0) / 8 * 6.283
    centres = torch.stack([ang.cos(), ang.sin()], 1)
    x = torch.randn(400, 2, generator=g) * 0.6 + centres[0] * 0.6  # skewed towards code 0
    d = torch.cdist(x, centres) ** 2
    assert torch.bincount(d.argmin(1), minlength=8).min() < 10
    counts = torch.bincount(sinkhorn_assign(d, 0.05, 200), minlength=8)
    assert counts.min() >= 40 and counts.max() <= 60


def _random_codes(n: int, levels: int, k: int, seed: int) -> torch.Tensor:
    all_t = list(itertools.product(range(k), repeat=levels))
    pick = np.random.default_rng(seed).choice(len(all_t), n, replace=False)
    return torch.tensor([all_t[i] for i in pick])


@pytest.mark.parametrize("beam", [1, 7, 64, 500])
def test_trie_beam_search_never_emits_an_invalid_tuple(beam: int) -> None:
    codes = _random_codes(60, 3, 5, seed=beam)
    trie = CodeTrie(codes)
    g = torch.Generator().manual_seed(beam)
    tables = [torch.randn(4, 5, generator=g) * 3 for _ in range(3)]

    def logits(lv: int, prefix: torch.Tensor) -> torch.Tensor:  # depends on the prefix
        bias = prefix.sum(-1, keepdim=True).float() if lv else 0.0
        return tables[lv].unsqueeze(1).expand(-1, prefix.shape[1], -1) + bias * 0.7

    loc, score, emitted = beam_search(logits, trie, 4, beam)
    valid = loc >= 0
    assert valid[:, 0].all() and (valid.sum(1) == min(beam, 60)).all()
    assert torch.equal(emitted[valid], codes[loc[valid]])  # every emitted tuple is a location's tuple
    for b in range(4):
        assert all(trie.lookup(t) >= 0 for t in emitted[b][valid[b]].tolist())
    assert (score[valid].isfinite()).all() and (~score[~valid].isfinite()).all()
    assert (score[:, 1:] <= score[:, :-1] + 1e-6)[valid[:, 1:]].all()  # best first
    # exhaustive: with a beam >= #locations the search returns exactly the valid tuples sorted by log-prob
    if beam >= 60:
        lp = [torch.log_softmax(logits(lv, codes[None, :, :lv].expand(4, -1, -1)), -1) for lv in range(3)]
        full = sum(lp[lv].gather(2, codes[None, :, lv, None].expand(4, -1, 1))[..., 0] for lv in range(3))
        ref = full.argsort(1, descending=True)
        assert torch.equal(loc[:, :60], ref)
    assert trie.lookup([9, 9, 9]) == -1
    ranks = beam_ranks(loc, loc[:, 0], 60)
    assert (ranks == 1).all()


def _tokens_cfg(debug_cfg: Config, tmp_path, **tokens) -> Config:
    codes = _random_codes(L, 2, 8, seed=0)
    path = tmp_path / "location_codes.json"
    path.write_text(json.dumps({str(i): c for i, c in enumerate(codes.tolist())}))
    tk = dataclasses.replace(debug_cfg.model.tokens, codes_path=str(path), **tokens)
    return dataclasses.replace(debug_cfg, model=dataclasses.replace(debug_cfg.model, tokens=tk))


def test_tokens_default_off(debug_cfg: Config) -> None:
    tk = debug_cfg.model.tokens
    assert not (tk.enabled or tk.gen_head or tk.recovery) and debug_cfg.loss.recovery_weight == 0
    m = build_model(debug_cfg.model, DataInfo(torch.randn(L, 2), 1000.0))
    assert m.qtmob is None
    with pytest.raises(ConfigError, match="codes"):
        load_config(ROOT / "configs" / "debug.yaml", ["model.heads.ranking=codes"])
    with pytest.raises(ConfigError, match="recovery"):
        load_config(ROOT / "configs" / "debug.yaml", ["loss.recovery_weight=1"])
    c = load_config(ROOT / "configs" / "debug.yaml", ["model.tokens.enabled=true", "data.dir=/x/d"])
    assert c.model.tokens.codes_path == "/x/d/location_codes.json"


def test_model_with_tokens_and_code_head(debug_cfg: Config, tmp_path) -> None:
    cfg = _tokens_cfg(debug_cfg, tmp_path, enabled=True, gen_head=True, recovery=True, beam=5)
    torch.manual_seed(0)
    m = build_model(cfg.model, DataInfo(torch.randn(L, 2), 1000.0))
    b = random_batch(L=L)
    pred, aux = m(b)
    assert pred.code_logits.shape == (4, 2, 8) and torch.equal(
        pred.code_targets, m.qtmob.loc_codes[b["target_loc"]]
    )
    parts = compute_loss(pred, aux, b, cfg.loss, 1000.0)
    assert "loss_codes" in parts.as_floats() and torch.isfinite(parts.total)
    parts.total.backward()
    assert m.qtmob.code_emb[0].weight.grad.abs().sum() > 0 and m.qtmob.head.start.weight.grad is not None
    loc, _ = m.qtmob.decode(pred.hidden.detach())
    assert loc.shape == (4, 5) and ((loc >= 0) & (loc < L)).all()
    # the codes are an input: changing a history location's codes changes the output
    b2 = dict(b, hist_loc=b["hist_loc"].clone())
    b2["hist_loc"][1, -1] = (b["hist_loc"][1, -1] + 1) % L
    with torch.no_grad():
        assert not torch.allclose(m(b)[0].xy, m(b2)[0].xy)
