"""Freezing: static-shape routing + frozen experts equal the eager PersonalMoE; in-graph ranking equals
a scipy KD-tree; a HF Llama decoder with frozen MoE layers equals the eager one."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from export.freeze import CandidateRanker, freeze_moe_layers
from nextlocmoe.config import PersonalMoEConfig
from nextlocmoe.model.personal_moe import PersonalMoE, RoutingContext
from nextlocmoe.model.routing import RoutingAux, select


def tiny_llama(layers: int = 2, d: int = 32, f: int = 64) -> LlamaModel:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)  # fmt: skip
    return LlamaModel(cfg).eval()


def make_moe(
    mlp: torch.nn.Module, routing: str = "topk", E: int = 5, seed: int = 0, ctx: RoutingContext | None = None
) -> PersonalMoE:
    cfg = PersonalMoEConfig(num_experts=E, lora_r=4, lora_alpha=8, lora_dropout=0.0, routing=routing, top_k=2,
                            tau=0.6, k_max=3, router_hidden=16)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    ctx = ctx or RoutingContext()
    moe = PersonalMoE(mlp, cfg, torch.randn(E, 12, generator=g), 8, 0, ctx, seed=seed).eval()
    with torch.no_grad():  # LoRA B is zero at init: make the experts differ
        for ex in moe.experts.lora:
            for n in ("gate_B", "up_B", "down_B"):
                getattr(ex, n).copy_(torch.randn(getattr(ex, n).shape, generator=g) * 0.1)
    return moe


def run_layer(moe: PersonalMoE, x_BSD: torch.Tensor, ctx_BC: torch.Tensor) -> tuple[torch.Tensor, RoutingAux]:
    """One forward of a standalone layer inside its routing scope: (y, its RoutingAux)."""
    with moe.context.scope(ctx_BC) as records:
        y = moe(x_BSD)
    return y, records[0]


@pytest.mark.parametrize("routing", ["topk", "threshold"])
@pytest.mark.parametrize("compute", ["masked", "folded"])
@pytest.mark.parametrize("balanced", [False, True])
def test_frozen_moe_matches_eager(routing: str, compute: str, balanced: bool) -> None:
    moe = make_moe(tiny_llama().layers[0].mlp, routing)
    if balanced:  # a trained balancing bias (model/balance.py) is frozen as a constant and changes choices
        moe.router.sel_bias_E.copy_(torch.tensor([1.5, -2.0, 0.3, 0.0, -0.7]))
    frozen = copy.deepcopy(moe)
    assert freeze_moe_layers(frozen, compute) == 1 and isinstance(frozen, PersonalMoE)
    assert frozen.router.per_EH is not None and frozen.context is not moe.context
    x_BSD, ctx_BC = torch.randn(3, 7, 32), torch.randn(3, 8)
    with torch.no_grad():
        (y_e, a_e), (y_f, a_f) = run_layer(moe, x_BSD, ctx_BC), run_layer(frozen, x_BSD, ctx_BC)
    assert torch.equal(a_e.ids_TK, a_f.ids_TK)
    torch.testing.assert_close(a_f.w_TK, a_e.w_TK, atol=1e-6, rtol=0)
    if balanced:  # the bias did change what is selected (else the check above would be vacuous)
        c = moe.cfg
        unbiased, _ = select(a_e.probs_TE, c.routing, c.top_k, c.tau, c.k_max)
        assert not torch.equal(unbiased, a_e.ids_TK)
    torch.testing.assert_close(y_f, y_e, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["grouped", "masked", "masked-frozen", "folded-frozen"])
def test_every_expert_strategy_matches_the_reference_with_empty_slots(strategy: str) -> None:
    moe = make_moe(tiny_llama().layers[0].mlp, E=4)
    name, _, frozen = strategy.partition("-")
    if frozen:
        moe.experts.freeze(name)
    x_TD = torch.randn(10, 32)
    ids_TK = torch.tensor([[0, 1, -1]] * 5 + [[3, -1, -1]] * 3 + [[2, 0, 1]] * 2)
    w_TK = torch.rand(10, 3) * (ids_TK >= 0)
    with torch.no_grad():
        got, ref = moe.experts(x_TD, ids_TK, w_TK, name), moe.experts(x_TD, ids_TK, w_TK, "reference")
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def test_folded_needs_freeze_and_unknown_strategy_is_named() -> None:
    moe = make_moe(tiny_llama().layers[0].mlp, E=4)
    x, ids, w = torch.randn(2, 32), torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2)
    with pytest.raises(RuntimeError, match="freeze"):
        moe.experts(x, ids, w, "folded")
    with pytest.raises(ValueError, match="grouped"):
        moe.experts(x, ids, w, "sparse")
    with pytest.raises(ValueError, match="static shapes"):
        freeze_moe_layers(moe, "grouped")


def test_frozen_router_is_fp32_in_half_model() -> None:
    moe = make_moe(tiny_llama().layers[0].mlp)
    freeze_moe_layers(moe, "masked")
    moe.half()
    probs, ids, w = moe.router.route(torch.randn(6, 32).half(), torch.randn(6, 8).half())
    assert probs.dtype == torch.float32 and w.dtype == torch.float32 and ids.dtype == torch.int64


def test_llama_with_frozen_moes_matches_eager() -> None:
    """A tiny HF LlamaModel fed with inputs_embeds, FFNs of layers 0 and 1 swapped for PersonalMoE."""
    eager, ctx = tiny_llama(), RoutingContext()
    for i in (0, 1):
        eager.layers[i].mlp = make_moe(eager.layers[i].mlp, "threshold", seed=i, ctx=ctx)
    frozen = copy.deepcopy(eager)
    assert freeze_moe_layers(frozen, "masked") == 2
    assert frozen.layers[0].mlp.context is frozen.layers[1].mlp.context  # one context per copied model
    x, h, mask = torch.randn(4, 9, 32), torch.randn(4, 8), torch.ones(4, 9, dtype=torch.long)
    mask[0, :3] = 0
    outs = []
    for model in (eager, frozen):
        with model.layers[0].mlp.context.scope(h) as records, torch.no_grad():
            outs.append(model(inputs_embeds=x, attention_mask=mask).last_hidden_state)
        assert len(records) == 2
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_a_layer_outside_its_routing_scope_raises() -> None:
    moe = make_moe(tiny_llama().layers[0].mlp)
    with pytest.raises(RuntimeError, match="scope"):
        moe(torch.randn(1, 2, 32))


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
