"""The whole model on the debug flavour: shapes, masks, aux outputs, frozen/trainable sets, text init,
loading a Llama-family checkpoint from a local path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nextlocmoe.config import Config, load_config
from nextlocmoe.model import text
from nextlocmoe.model.build import build_model
from nextlocmoe.model.loss import compute_loss
from nextlocmoe.model.nextlocmoe import DataInfo
from nextlocmoe.model.personal_moe import PersonalMoE
from nextlocmoe.model.semantic_moe import project_text_to_weights
from tests.unit.conftest import random_batch

L = 50


@pytest.fixture(scope="module")
def model(debug_cfg: Config):
    torch.manual_seed(0)
    return build_model(debug_cfg.model, DataInfo(torch.randn(L, 2), 1000.0))


def test_forward_shapes_and_aux(model, debug_cfg: Config) -> None:
    b = random_batch(L=L)
    pred, aux = model(b)
    assert pred.xy.shape == (4, 2) and pred.dur.shape == (4,) and pred.scores.shape == (4, L)
    assert (pred.dur >= 0).all()
    n_moe = len(debug_cfg.model.moe_layers())
    assert len(aux.personal) == n_moe == len(model.moe_layers()) >= 1
    S = len(model.prompt_ids) + 12 + 5
    for a in aux.personal:
        assert a.probs_TE.shape == (4 * S, debug_cfg.model.personal_moe.num_experts)
        assert a.ids_TK.shape == (4 * S, 2)
    assert aux.semantic.probs_TE.shape == (4 * 5, 5) and aux.semantic.ids_TK.shape == (4 * 5, 2)
    parts = compute_loss(pred, aux, b, debug_cfg.loss, 1000.0)
    assert torch.isfinite(parts.total) and parts.entropy > 0
    routing = 300.0 * parts.balance.item() + 100.0 * (
        parts.semantic_balance.item() + parts.semantic_entropy.item()
    )
    assert parts.total.item() == pytest.approx(
        parts.distance_m.item() + 300.0 * parts.entropy.item() + 1000.0 * parts.scored.item() + routing,
        rel=1e-5,
    )
    assert parts.semantic_entropy.item() > 0 and parts.balance.item() >= 0
    # persona balancing acts on the 5 current-window positions across the batch (balance_scope=current)
    assert aux.focus == 5 and all(a.probs_TE.shape[0] == 4 * 5 for a in aux.balanced())
    per_pos = torch.stack([a.position_balance for a in aux.balanced()]).mean()
    assert parts.balance.item() == pytest.approx(per_pos.item(), rel=1e-6)


def test_padded_history_is_ignored(model) -> None:
    model.eval()
    b = random_batch(L=L)
    b2 = {k: v.clone() for k, v in b.items()}
    b2["hist_xy"][0, :6] = 99.0  # sample 0's first 6 history records are padding
    b2["hist_hour"][0, :6] = 3
    with torch.no_grad():
        p1, _ = model(b)
        p2, _ = model(b2)
    assert torch.allclose(p1.xy, p2.xy, atol=1e-5)
    b2["hist_xy"][0, 8] = 99.0  # a real record: must matter
    with torch.no_grad():
        p3, _ = model(b2)
    assert not torch.allclose(p1.xy[0], p3.xy[0], atol=1e-4)
    model.train()


def test_frozen_and_trainable_sets_match_the_spec(model) -> None:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for n in frozen:  # frozen: token embeddings, attention, norms, original FFN weights (the shared base)
        assert n.startswith("decoder.") and ".lora." not in n and ".router." not in n, n
    assert any("embed_tokens" in n for n in frozen) and any("self_attn" in n for n in frozen)
    assert any("mlp.experts.base.gate_proj" in n for n in frozen)
    for n in trainable:  # trained: LoRA, routers, input projections, TCN, semantic MoE, heads
        ok = (".lora." in n or ".router." in n) or n.split(".")[0] in (
            "rec",
            "history",
            "semantic",
            "proj_hist",
            "proj_cur",
            "heads",
            "scored",
        )
        assert ok, n
    assert not any(n.startswith("decoder.") and "self_attn" in n for n in trainable)


def test_semantic_experts_follow_text_similarity() -> None:
    t = text.minilm_embed(text.category_texts())
    assert t.shape == (5, 384)
    w = project_text_to_weights(t, d_loc=128).flatten(1)
    cos_t = torch.nn.functional.cosine_similarity(t.unsqueeze(1), t.unsqueeze(0), dim=-1)
    cos_w = torch.nn.functional.cosine_similarity(w.unsqueeze(1), w.unsqueeze(0), dim=-1)
    off = ~torch.eye(5, dtype=torch.bool)
    assert (cos_w[off] - cos_t[off]).abs().max() < 0.2  # JL projection keeps the semantic geometry
    assert torch.corrcoef(torch.stack([cos_w[off], cos_t[off]]))[0, 1] > 0.7


def test_model_experts_initialised_from_text(model) -> None:
    cats = text.minilm_embed(text.category_texts())
    assert torch.allclose(model.semantic.w_ELI.detach(), project_text_to_weights(cats, 32), atol=1e-6)
    persona = text.minilm_embed(text.persona_texts(4))
    for moe in model.moe_layers():
        assert torch.allclose(moe.router.persona_EP, persona)


def test_threshold_routing_model(debug_cfg: Config) -> None:
    m_cfg = dataclasses.replace(
        debug_cfg.model,
        personal_moe=dataclasses.replace(debug_cfg.model.personal_moe, routing="threshold", tau=0.6, k_max=3),
    )
    m = build_model(m_cfg, DataInfo(torch.randn(L, 2), 1000.0))
    _, aux = m(random_batch(L=L))
    assert aux.personal[0].ids_TK.shape[1] == 3


def test_backbone_from_local_checkpoint(tmp_path, debug_cfg: Config) -> None:
    """The real loading path: a tiny LlamaForCausalLM saved with save_pretrained, loaded, truncated."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
        )
    )
    lm.save_pretrained(tmp_path / "ckpt")
    over = [
        f"model.backbone.path={tmp_path / 'ckpt'}",
        "model.backbone.num_layers=3",
        "model.personal_moe.start_layer=1",
        "model.personal_moe.every=2",
    ]
    cfg = load_config("configs/debug.yaml", over)
    m = build_model(cfg.model, DataInfo(torch.randn(L, 2), 1000.0))
    assert len(m.decoder.layers) == 3 and m.decoder.config.hidden_size == 48
    assert isinstance(m.decoder.layers[1].mlp, PersonalMoE) and not isinstance(
        m.decoder.layers[2].mlp, PersonalMoE
    )
    ref = lm.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(m.decoder.layers[0].self_attn.q_proj.weight, ref)  # weights really come from disk
    base = m.decoder.layers[1].mlp.experts.base.up_proj.weight
    assert torch.equal(base, lm.model.layers[1].mlp.up_proj.weight)
    pred, _ = m(random_batch(L=L))
    assert torch.isfinite(pred.xy).all()
    missing = load_config("configs/debug.yaml", [f"model.backbone.path={tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_model(missing.model, DataInfo(torch.randn(L, 2), 1000.0))


def test_debug_step_is_fast(model, debug_cfg: Config) -> None:
    import time

    b = random_batch(B=32, H=40, L=L)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for _ in range(4):
        t = time.perf_counter()
        pred, aux = model(b)
        compute_loss(pred, aux, b, debug_cfg.loss, 1000.0).total.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    assert min(times) < 1.0, times  # "a training step on CPU in well under a second"


def test_text_semantics_from_the_backbone_tokenizer(tmp_path) -> None:
    """With a pretrained backbone + tokenizer (text_encoder=auto -> backbone), category / persona / prompt
    embeddings are means of the backbone's own token embeddings (the reference), not MiniLM."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted(
        {w.strip(".,:;()").lower() for t in text.category_texts() + text.persona_texts(4) for w in t.split()}
    )
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(vocab),
        )
    )
    lm.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    cfg = load_config(
        "configs/debug.yaml", [f"model.backbone.path={tmp_path / 'ckpt'}", "model.text_encoder=auto"]
    )
    m = build_model(cfg.model, DataInfo(torch.randn(L, 2), 1000.0))
    emb = lm.model.embed_tokens.weight
    want = torch.stack(
        [emb[tok(t, add_special_tokens=False)["input_ids"]].mean(0) for t in text.persona_texts(4)]
    )
    assert torch.allclose(m.moe_layers()[0].router.persona_EP, want, atol=1e-6)
    assert torch.equal(
        m.prompt_ids, tok(cfg.model.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    )


def test_time_prior_routes_by_the_text_of_the_visit_time(debug_cfg: Config) -> None:
    """semantic_moe.time_prior: fixed prior logits per (weekday, hour) slot from the similarity of the
    slot's description to each category's text (semantic_moe.time_prior_table)."""
    from nextlocmoe.model.semantic_moe import time_prior_table

    prior = time_prior_table(text.embed_texts(text.time_slot_texts(), "minilm"),
                             text.embed_texts(text.category_texts(), "minilm"))  # fmt: skip
    assert prior.shape == (168, 5) and prior.mean(-1).abs().max() < 1e-5 and prior.std() == pytest.approx(1.0)
    names = list(text.FUNCTION_CATEGORIES)
    sat_night, mon_morning = prior[5 * 24 + 23], prior[0 * 24 + 9]  # index = weekday * 24 + hour
    assert names[int(sat_night.argmax())] == "Entertainment"
    assert names[int(mon_morning.argmax())] == "Education"
    cfg = dataclasses.replace(debug_cfg.model, semantic_moe=dataclasses.replace(
        debug_cfg.model.semantic_moe, time_prior=2.0))  # fmt: skip
    torch.manual_seed(0)
    m = build_model(cfg, DataInfo(torch.randn(L, 2), 1000.0)).eval()
    assert torch.allclose(m.semantic.prior_NE, 2.0 * prior, atol=1e-5)
    with torch.no_grad():  # with the router's own logits at zero, routing IS the prior of the slot
        m.semantic.router.net[2].weight.zero_()
        m.semantic.router.net[2].bias.zero_()
        b = random_batch(L=L)
        _, aux = m(b)
    slot = (b["cur_weekday"] * 24 + b["cur_hour"]).reshape(-1)
    assert torch.allclose(aux.semantic.probs_TE, torch.softmax(2.0 * prior[slot], -1), atol=1e-5)
