"""Routing functions: top-k, threshold (top-p, capped), ties, entropy, load, routers."""

from __future__ import annotations

import math

import pytest
import torch

from nextlocmoe.config import PersonalMoEConfig
from nextlocmoe.model.routing import (
    HistoryAwareRouter,
    combine_weights_TE,
    expert_load,
    router_entropy,
    select,
    threshold_select,
    topk_select,
)


def test_topk_picks_largest_in_order() -> None:
    p = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.4, 0.3, 0.2, 0.1]])
    ids, w = topk_select(p, 2)
    assert ids.tolist() == [[1, 3], [0, 1]]
    assert torch.allclose(w, torch.tensor([[0.5, 0.25], [0.4, 0.3]]))


def test_topk_ties_go_to_lower_expert_id() -> None:
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.3, 0.3, 0.3]])
    ids, _ = topk_select(p, 2)
    assert ids.tolist() == [[0, 1], [1, 2]]


def test_threshold_smallest_prefix_reaching_tau() -> None:
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.9, 0.05, 0.03, 0.02], [0.3, 0.3, 0.2, 0.2]])
    ids, w = threshold_select(p, tau=0.8, k_max=4)
    # row 0: 0.5, +0.2 = 0.7 < 0.8, +0.2 = 0.9 >= 0.8 -> 3 experts
    assert ids[0].tolist() == [0, 1, 2, -1]
    # row 1: 0.9 alone reaches tau
    assert ids[1].tolist() == [0, -1, -1, -1]
    assert ids[2].tolist() == [0, 1, 2, -1]
    assert torch.allclose(w[0], torch.tensor([0.5, 0.2, 0.2, 0.0]))
    assert (w[ids < 0] == 0).all()


def test_threshold_cap() -> None:
    p = torch.full((3, 8), 1 / 8)
    ids, w = threshold_select(p, tau=0.99, k_max=5)
    assert ids.shape == (3, 5) and (ids >= 0).all()  # would need 8, capped at 5
    assert torch.allclose(w.sum(-1), torch.full((3,), 5 / 8))


def test_threshold_exact_tau_boundary() -> None:
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    ids, _ = threshold_select(p, tau=0.8, k_max=3)
    assert ids.tolist() == [[0, 1, -1]]  # mass before slot 2 is 0.8, not < 0.8


def test_renormalize() -> None:
    p = torch.tensor([[0.5, 0.3, 0.2]])
    _, w = select(p, "topk", 2, 0.8, 3, renormalize=True)
    assert torch.allclose(w.sum(-1), torch.ones(1))
    with pytest.raises(ValueError):
        select(p, "nope", 2, 0.8, 3)


def test_entropy_uniform_and_onehot() -> None:
    assert math.isclose(router_entropy(torch.full((2, 4), 0.25)).item(), math.log(4), rel_tol=1e-6)
    assert router_entropy(torch.tensor([[1.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_load_and_combine() -> None:
    ids = torch.tensor([[0, 2], [2, -1]])
    w = torch.tensor([[0.6, 0.3], [0.9, 0.0]])
    assert torch.allclose(expert_load(ids, 3), torch.tensor([1 / 3, 0.0, 2 / 3]))
    assert torch.allclose(combine_weights_TE(ids, w, 3), torch.tensor([[0.6, 0.0, 0.3], [0.0, 0.0, 0.9]]))


def test_history_aware_router_uses_history_and_personas() -> None:
    torch.manual_seed(0)
    cfg = PersonalMoEConfig(num_experts=5, router_hidden=16, top_k=2)
    r = HistoryAwareRouter(8, 6, torch.randn(5, 10), cfg)
    x, ctx = torch.randn(4, 8), torch.randn(4, 6)
    p = r(x, ctx)
    assert p.shape == (4, 5) and p.dtype == torch.float32
    assert torch.allclose(p.sum(-1), torch.ones(4))
    assert not torch.allclose(p, r(x, ctx + 1.0))  # the history vector changes routing
    # equals the literal definition v . gelu(W [x ; h ; p_e] + b)
    W = torch.cat([r.w_x.weight, r.w_h.weight, r.w_p.weight], 1)
    cat = torch.cat(
        [
            x.unsqueeze(1).expand(4, 5, 8),
            ctx.unsqueeze(1).expand(4, 5, 6),
            r.persona_EP.unsqueeze(0).expand(4, 5, 10),
        ],
        -1,
    )
    logits = r.v(torch.nn.functional.gelu(cat @ W.t() + r.w_x.bias)).squeeze(-1)
    assert torch.allclose(p, torch.softmax(logits, -1), atol=1e-6)
    assert "persona_EP" not in dict(r.named_parameters())  # fixed semantics, not trained


def test_expert_counts_ignore_empty_slots_and_masked_tokens() -> None:
    """THE expert count (balancing, Switch loss, grouped split sizes, DeepSpeed exp_counts, monitoring)."""
    from nextlocmoe.model.routing import expert_counts

    ids = torch.tensor([[0, 2], [1, -1], [2, -1], [0, 0]])
    assert expert_counts(ids, 4).tolist() == [3.0, 1.0, 2.0, 0.0]
    mask = torch.tensor([True, False, True, True])  # token 1 is padding
    assert expert_counts(ids, 4, mask).tolist() == [3.0, 0.0, 2.0, 0.0]
    assert expert_counts(ids, 4).dtype == torch.float32


def test_combine_is_fp32_and_ignores_zero_weight_slots() -> None:
    """THE combine: sum_k w_k v_k in fp32 even for bf16 values (a weight below bf16's resolution counts)."""
    from nextlocmoe.model.routing import combine

    v = torch.ones(2, 3, 4, dtype=torch.bfloat16)
    w = torch.tensor([[1.0, 1e-4, 0.0], [0.5, 0.25, 0.0]])
    out = combine(v, w)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0], torch.tensor([1.0001, 0.75]))
