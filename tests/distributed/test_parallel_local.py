"""train/parallel.py checks that need no process group (ep_size=1, single process): fast."""

from __future__ import annotations

import copy

import pytest
import torch
import toy

from nextlocmoe.model.routing import expert_counts, load_balancing_loss
from train.parallel import (
    ZERO3_MOE_ERROR,
    ExpertParallelDispatcher,
    check_strategy,
    gather_expert_state,
    model_has_moe,
    parallelize,
    scatter_expert_state,
    single_device_state,
    sparse_routes_from_selection,
)


def test_check_strategy() -> None:
    check_strategy(2, True)
    check_strategy(3, False)
    with pytest.raises(ValueError, match="Native DeepSpeed MoE is not supported with ZeRO Stage 3"):
        check_strategy(3, True)
    assert "ZeRO-1/2" in ZERO3_MOE_ERROR


@pytest.mark.parametrize("routing", ["topk", "threshold"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_ds_layer_matches_personal_moe(routing: str, renormalize: bool) -> None:
    m = toy.ToyMoEModel(routing)
    for blk in m.layers:
        blk.mlp.cfg.renormalize = renormalize
    d = parallelize(copy.deepcopy(m), 1)
    assert model_has_moe(d) and not model_has_moe(m)
    assert all(
        isinstance(b.mlp.dispatcher, ExpertParallelDispatcher) and b.mlp.experts is None for b in d.layers
    )
    x, c, _ = toy.batch(0)
    y_l, aux_l = m(x, c)
    y_d, aux_d = d(x, c)
    torch.testing.assert_close(y_d, y_l, atol=1e-5, rtol=1e-5)
    for a_l, a_d in zip(aux_l, aux_d, strict=True):
        assert torch.equal(a_l.ids_TK, a_d.ids_TK)
        torch.testing.assert_close(a_d.w_TK, a_l.w_TK)
        torch.testing.assert_close(a_d.probs_TE, a_l.probs_TE)
        lb = load_balancing_loss(a_l.probs_TE, expert_counts(a_l.ids_TK, toy.E))
        torch.testing.assert_close(a_d.l_aux, lb)
        assert torch.equal(a_d.load_E(), a_l.load_E())


def test_sparse_routes_contract() -> None:
    """-1 slots stay empty, locations number each expert's tokens 0.., capacity = largest expert load."""
    ids_TK = torch.tensor([[1, 0, -1], [1, -1, -1], [2, 1, 0]])
    w_TK = torch.tensor([[0.5, 0.3, 0.0], [0.9, 0.0, 0.0], [0.4, 0.3, 0.2]])
    probs_TE = torch.full((3, 4), 0.25)
    l_aux, cap, E, idx_KT, loc_KT, gates_KT, counts = sparse_routes_from_selection(probs_TE, ids_TK, w_TK)
    assert E == 4 and int(cap) == 3 and counts.tolist() == [2, 3, 1, 0]
    assert idx_KT.dtype == loc_KT.dtype == torch.int32 and gates_KT.dtype == torch.float32
    assert torch.equal(idx_KT, ids_TK.t().int())
    assert loc_KT.t().tolist() == [[0, 0, 0], [1, 0, 0], [0, 2, 1]]
    assert torch.equal(gates_KT, w_TK.t())
    torch.testing.assert_close(l_aux, torch.tensor(1.0))  # uniform probs: balanced value


def test_state_name_mapping_round_trip() -> None:
    m = toy.ToyMoEModel("topk")
    d = parallelize(copy.deepcopy(m), 1)
    local = single_device_state(d)
    want = m.state_dict()
    assert set(local) == set(want)
    for k in want:
        assert torch.equal(local[k], want[k]), k
    back = scatter_expert_state(local, d)
    d.load_state_dict(back, strict=True)


def test_ep2_needs_init_distributed() -> None:
    with pytest.raises(RuntimeError, match="init_distributed"):
        parallelize(toy.ToyMoEModel("topk"), 2)


def test_gather_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="mp_rank_00_model_states.pt"):
        gather_expert_state(tmp_path, "nope")


def test_bf16_module_keeps_fp32_router() -> None:
    """DeepSpeed's bf16 mode casts the whole module; the gate still routes in fp32 and trains."""
    d = parallelize(toy.ToyMoEModel("threshold"), 1).bfloat16()
    x, c, t = toy.batch(0)
    y, aux = d(x.bfloat16(), c.bfloat16())
    assert y.dtype == torch.bfloat16 and aux[0].probs_TE.dtype == torch.float32
    toy.toy_loss(y.float(), t, aux).backward()
    router = d.layers[0].mlp.router
    assert router.w_x.weight.grad is not None and router.w_x.weight.grad.dtype == torch.bfloat16
