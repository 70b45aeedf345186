"""Freezing: static-shape routing + frozen experts equal the eager PersonalMoE; in-graph ranking equals
a scipy KD-tree; a HF Llama decoder with frozen MoE layers equals the eager one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from export.freeze import (
    CandidateRanker,
    FoldedExperts,
    FrozenPersonalMoE,
    SharedBaseExperts,
    swap_frozen_moes,
)
from nextlocmoe.config import PersonalMoEConfig
from nextlocmoe.model.personal_moe import PersonalMoE
from nextlocmoe.model.routing import RoutingAux, select


def tiny_llama(layers: int = 2, d: int = 32, f: int = 64) -> LlamaModel:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)  # fmt: skip
    return LlamaModel(cfg).eval()


def make_moe(mlp: torch.nn.Module, routing: str = "topk", E: int = 5, seed: int = 0) -> PersonalMoE:
    cfg = PersonalMoEConfig(num_experts=E, lora_r=4, lora_alpha=8, lora_dropout=0.0, routing=routing, top_k=2,
                            tau=0.6, k_max=3, router_hidden=16)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    moe = PersonalMoE(mlp, cfg, torch.randn(E, 12, generator=g), d_ctx=8, layer_idx=0, seed=seed).eval()
    with torch.no_grad():  # LoRA B is zero at init: make the experts differ
        for ex in moe.experts.lora:
            for n in ("gate_B", "up_B", "down_B"):
                getattr(ex, n).copy_(torch.randn(getattr(ex, n).shape, generator=g) * 0.1)
    return moe


@pytest.mark.parametrize("routing", ["topk", "threshold"])
@pytest.mark.parametrize("compute", ["shared", "folded"])
@pytest.mark.parametrize("balanced", [False, True])
def test_frozen_moe_matches_eager(routing: str, compute: str, balanced: bool) -> None:
    moe = make_moe(tiny_llama().layers[0].mlp, routing)
    if balanced:  # a trained balancing bias (model/balance.py) is frozen as a constant and changes choices
        moe.router.sel_bias_E.copy_(torch.tensor([1.5, -2.0, 0.3, 0.0, -0.7]))
    frozen = FrozenPersonalMoE(moe, compute)
    x_BSD, ctx_BC = torch.randn(3, 7, 32), torch.randn(3, 8)
    sink_e: list[RoutingAux] = []
    sink_f: list[RoutingAux] = []
    moe.bind(ctx_BC, sink_e)
    frozen.bind(ctx_BC, sink_f)
    with torch.no_grad():
        y_e, y_f = moe(x_BSD), frozen(x_BSD)
    assert torch.equal(sink_e[0].ids_TK, sink_f[0].ids_TK)
    torch.testing.assert_close(sink_f[0].w_TK, sink_e[0].w_TK, atol=1e-6, rtol=0)
    if balanced:  # the bias did change what is selected (else the check above would be vacuous)
        c = moe.cfg
        unbiased, _ = select(sink_e[0].probs_TE, c.routing, c.top_k, c.tau, c.k_max)
        assert not torch.equal(unbiased, sink_e[0].ids_TK)
    torch.testing.assert_close(y_f, y_e, atol=2e-6, rtol=1e-5)
    if routing == "threshold":
        assert (sink_f[0].ids_TK == -1).any() or (sink_f[0].ids_TK >= 0).all()


@pytest.mark.parametrize("cls", [SharedBaseExperts, FoldedExperts])
def test_frozen_experts_match_naive_with_empty_slots(cls: type) -> None:
    moe = make_moe(tiny_llama().layers[0].mlp, E=4)
    x_TD = torch.randn(10, 32)
    ids_TK = torch.tensor([[0, 1, -1]] * 5 + [[3, -1, -1]] * 3 + [[2, 0, 1]] * 2)
    w_TK = torch.rand(10, 3) * (ids_TK >= 0)
    with torch.no_grad():
        got, ref = cls(moe.experts)(x_TD, ids_TK, w_TK), moe.experts.forward_naive(x_TD, ids_TK, w_TK)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def test_frozen_router_is_fp32_in_half_model() -> None:
    moe = make_moe(tiny_llama().layers[0].mlp)
    frozen = FrozenPersonalMoE(moe)
    probs, ids, w = frozen.router(torch.randn(2, 3, 32).half(), torch.randn(2, 8).half())
    assert probs.dtype == torch.float32 and w.dtype == torch.float32 and ids.dtype == torch.int64


def test_llama_with_frozen_moes_matches_eager() -> None:
    """A tiny HF LlamaModel fed with inputs_embeds, FFNs of layers 0 and 1 swapped for PersonalMoE."""
    eager = tiny_llama()
    for i in (0, 1):
        eager.layers[i].mlp = make_moe(eager.layers[i].mlp, "threshold", seed=i)
    import copy

    frozen = copy.deepcopy(eager)
    assert swap_frozen_moes(frozen, "shared") == 2
    x, ctx, mask = torch.randn(4, 9, 32), torch.randn(4, 8), torch.ones(4, 9, dtype=torch.long)
    mask[0, :3] = 0
    outs = []
    for model in (eager, frozen):
        for layer in model.layers:
            layer.mlp.bind(ctx, [])
        with torch.no_grad():
            outs.append(model(inputs_embeds=x, attention_mask=mask).last_hidden_state)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["point", "scored"])
def test_ranker_matches_kdtree_and_argsort(mode: str) -> None:
    from scipy.spatial import cKDTree

    g = torch.Generator().manual_seed(0)
    loc = torch.randn(300, 2, generator=g)
    pred, scores = torch.randn(6, 2, generator=g), torch.randn(6, 300, generator=g)
    ids, vals = CandidateRanker(loc, 10, mode, scale=250.0)(pred, scores)
    if mode == "point":
        dist, ref = cKDTree(loc.double().numpy()).query(pred.double().numpy(), k=10)
        np.testing.assert_allclose(vals.numpy(), -dist * 250.0, rtol=1e-5, atol=1e-3)
    else:
        ref = np.argsort(-scores.numpy(), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids.numpy(), ref)
