"""Auxiliary-loss-free balancing (model/balance.py) and the routing diagnostics (eval/routing_stats.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextlocmoe.eval.routing_stats import layer_stats, mi_permutation_test, mutual_information
from nextlocmoe.model.balance import balance_routers, update_bias
from nextlocmoe.model.routing import (
    RoutingAux,
    expert_counts,
    marginal_imbalance,
    positional_imbalance,
    select,
)

E = 4


def _collapsed_probs(T: int = 512, seed: int = 0) -> torch.Tensor:
    """A router that sends nearly every token to expert 0 (then 1): probabilities [T, E]."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + torch.tensor([4.0, 2.0, 0.0, 0.0])
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_balancer_moves_a_collapsed_router_to_uniform(mode: str) -> None:
    probs = _collapsed_probs()
    bias = torch.zeros(E)
    ids0, _ = select(probs, mode, 1 if mode == "topk" else 2, 0.6, 3, scale_E=bias.exp())
    load0 = expert_counts(ids0, E) / expert_counts(ids0, E).sum()
    assert load0[0] > 0.8 and load0[2:].sum() < 0.05  # collapsed at the start
    for _ in range(400):
        ids, w = select(probs, mode, 1 if mode == "topk" else 2, 0.6, 3, scale_E=bias.exp())
        aux = RoutingAux(probs, ids, w, torch.zeros(()))
        balance_routers([(bias, [aux])], rate=0.02)
    c = expert_counts(ids, E)
    load = c / c.sum()
    assert load.min() >= 0.5 / E, load  # every expert at least half its fair share
    assert load.max() <= 1.5 / E, load
    # the weights of the chosen experts are their unbiased probabilities
    used = ids >= 0
    assert torch.allclose(w[used], probs.gather(1, ids.clamp_min(0))[used])


def test_zero_bias_selects_as_without_bias() -> None:
    probs = _collapsed_probs(seed=3)
    for mode in ("topk", "threshold"):
        a = select(probs, mode, 2, 0.8, 3)
        b = select(probs, mode, 2, 0.8, 3, scale_E=torch.ones(E))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_update_is_the_same_however_the_step_is_split() -> None:
    """Counts summed over micro-batches (and ranks): one step of 2 halves == one step of the whole."""
    probs = _collapsed_probs(seed=5)
    ids, w = select(probs, "topk", 2, 0.8, 3)
    whole, halves = torch.zeros(E), torch.zeros(E)
    balance_routers([(whole, [RoutingAux(probs, ids, w, torch.zeros(()))])], 0.1)
    parts = [RoutingAux(probs[s], ids[s], w[s], torch.zeros(())) for s in (slice(0, 200), slice(200, None))]
    balance_routers([(halves, parts)], 0.1)
    assert torch.equal(whole, halves) and whole.abs().sum() > 0
    b = torch.zeros(E)
    update_bias(b, torch.tensor([5.0, 1.0, 1.0, 1.0]), 0.1)  # overloaded expert 0 goes down, others up
    assert torch.allclose(b, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


def test_marginal_imbalance() -> None:
    assert marginal_imbalance(torch.full((8, E), 1.0 / E)).abs() < 1e-6
    onehot = torch.nn.functional.one_hot(torch.arange(8) % E, E).float()
    assert marginal_imbalance(onehot).abs() < 1e-6  # decisive per token AND balanced: no penalty
    assert marginal_imbalance(torch.nn.functional.one_hot(torch.zeros(8).long(), E).float()) > 1.3


def test_positional_imbalance_sees_routing_by_position() -> None:
    """Routing by POSITION (every sample's token s goes to expert s % E) is balanced when pooled, but the
    per-position term sees that it ignores the sample; routing by SAMPLE is balanced at every position."""
    B, S = 8, 4
    by_pos = torch.nn.functional.one_hot(torch.arange(S) % E, E).float().expand(B, S, E)
    assert marginal_imbalance(by_pos.reshape(-1, E)).abs() < 1e-6
    assert positional_imbalance(by_pos) == pytest.approx(np.log(E), abs=1e-5)
    by_sample = torch.nn.functional.one_hot(torch.arange(B) % E, E).float()[:, None].expand(B, S, E)
    assert positional_imbalance(by_sample).abs() < 1e-6


def test_tail_keeps_the_last_positions_of_every_sequence() -> None:
    B, S, K = 3, 7, 2
    probs = torch.softmax(torch.randn(B, S, E), -1)
    ids = torch.arange(B * S * K).view(B * S, K) % E
    aux = RoutingAux(probs.reshape(B * S, E), ids, ids.float(), torch.zeros(()), B)
    t = aux.tail(2)
    assert torch.equal(t.probs_TE, probs[:, -2:].reshape(-1, E))
    assert torch.equal(t.ids_TK, ids.view(B, S, K)[:, -2:].reshape(-1, K)) and t.batch == B
    with pytest.raises(ValueError, match="batch size"):
        RoutingAux(probs.reshape(B * S, E), ids, ids.float(), torch.zeros(())).tail(2)


def test_layer_stats_and_mutual_information() -> None:
    ids = np.array([[0, 1], [0, -1], [2, -1], [0, 1]])
    probs = np.full((4, E), 0.25)
    st = layer_stats(probs, ids)
    assert st["load"] == [0.5, pytest.approx(1 / 3, abs=1e-6), pytest.approx(1 / 6, abs=1e-6), 0.0]
    assert st["dead_experts"] == 1 and st["routed_slots"] == 6
    assert st["token_entropy"] == pytest.approx(np.log(E)) and st["max_load_over_fair"] == pytest.approx(2.0)
    a = np.repeat(np.arange(4), 50)
    assert mutual_information(a, a) == pytest.approx(np.log(4))
    rng = np.random.default_rng(0)
    dep = mi_permutation_test(a, a * 10 + 3, n_perm=199)
    assert dep["p_value"] <= 1 / 199 * 1.01 and dep["mi_nats"] > dep["null_p99"]
    ind = mi_permutation_test(rng.integers(0, 4, 400), rng.integers(0, 7, 400), n_perm=199)
    assert ind["p_value"] > 0.01 and ind["mi_nats"] < 0.1


def test_positional_objective_turns_routing_by_position_into_routing_by_sample() -> None:
    """A router that starts routing by position only (the collapse seen in training): descending entropy +
    per-position imbalance makes the choice at each position depend on the sample, while the pooled
    objective is already satisfied at the start and gives no such signal."""
    torch.manual_seed(0)
    B, S, F_ = 64, E, 8
    feat_BF = torch.randn(B, F_)
    pos_SE = torch.eye(S, E) * 6.0  # position s -> expert s, every sample alike
    w_FE = torch.zeros(F_, E, requires_grad=True)
    bias_SE = pos_SE.clone().requires_grad_(True)

    def probs() -> torch.Tensor:
        return torch.softmax(feat_BF[:, None] @ w_FE[None] + bias_SE[None], -1)  # [B, S, E]

    p0 = probs()
    assert marginal_imbalance(p0.reshape(-1, E)) < 0.01 and positional_imbalance(p0) > 1.0
    opt = torch.optim.Adam([w_FE, bias_SE], lr=0.05)
    for _ in range(300):
        p = probs()
        loss = (-(p * p.clamp_min(1e-12).log()).sum(-1).mean()) + positional_imbalance(p)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = probs()
    top_BS = p.argmax(-1)
    assert positional_imbalance(p) < 0.2
    for s in range(S):  # at every position several experts are used, chosen by the sample
        assert len(torch.unique(top_BS[:, s])) >= 3
