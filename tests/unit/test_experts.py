"""Shared-base persona experts == the reference math (each selected expert's full LoRA FFN) == PEFT."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from nextlocmoe.model.experts import PersonaExperts, expert_ffn
from nextlocmoe.model.peft_io import expert_as_peft
from nextlocmoe.model.routing import select


def make_experts(E: int = 6, D: int = 32, F: int = 64, r: int = 4, seed: int = 0) -> PersonaExperts:
    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F))
    for p in mlp.parameters():
        p.requires_grad_(False)
    ex = PersonaExperts(mlp, r=r, alpha=2.0 * r, dropout=0.0, expert_ids=list(range(E)), seed=seed)
    with torch.no_grad():  # B is zero at init: make experts differ
        for lora in ex.lora:
            for p in lora.parameters():
                p.normal_(0.0, 0.1)
    return ex


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (fp32 sums reorder: compare at the tensor's own scale)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def run(ex: PersonaExperts, mode: str, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    ex.zero_grad()
    y = ex(x, ids, w, mode)
    (y * torch.linspace(-1, 1, y.shape[1])).sum().backward()
    grads = [p.grad.clone() for p in ex.lora.parameters()]
    return y.detach(), x.grad, w.grad, grads


@pytest.mark.parametrize("routing", ["topk", "threshold"])
@pytest.mark.parametrize("mode", ["grouped", "static"])
def test_shared_base_equals_reference(routing: str, mode: str) -> None:
    ex = make_experts()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 32, generator=g)
    probs = torch.softmax(torch.randn(40, 6, generator=g) * 2, -1)
    ids, w = select(probs, routing, k=2, tau=0.7, k_max=4)
    if routing == "threshold":
        assert (ids < 0).any() and (ids >= 0).sum(1).max() > 2  # both empty slots and >2 experts occur
    ref = run(ex, "naive", x, ids, w)
    got = run(ex, mode, x, ids, w)
    # forward, d/dx, d/dw (the router's gradient path), d/dLoRA: equal to 1e-5 relative to each tensor's scale
    for a, b in zip([*got[:3], *got[3]], [*ref[:3], *ref[3]], strict=True):
        assert rel_err(a, b) <= 1e-5, rel_err(a, b)


def test_unrouted_expert_gets_no_gradient() -> None:
    ex = make_experts(E=4)
    x = torch.randn(8, 32)
    ids = torch.tensor([[0, 1]] * 8)
    _, _, _, grads = run(ex, "grouped", x, ids, torch.full((8, 2), 0.5))
    per_expert = [grads[i * 6 : (i + 1) * 6] for i in range(4)]
    assert all(g.abs().sum() > 0 for g in per_expert[0] + per_expert[1])
    assert all(g.abs().sum() == 0 for g in per_expert[2] + per_expert[3])


def test_expert_equals_peft_adapter() -> None:
    ex = make_experts(E=3)
    x = torch.randn(10, 32)
    for e in range(3):
        peft_mlp = expert_as_peft(ex, e)
        ours = expert_ffn(ex.base, ex.lora[e], x, ex.scaling, ex.drop)
        assert torch.allclose(ours, peft_mlp(x), atol=1e-5)


def test_lora_init_is_peft_like_and_placement_independent() -> None:
    a = make_experts(E=4, seed=3)
    mlp = a.base
    fresh = PersonaExperts(mlp, r=4, alpha=8.0, dropout=0.0, expert_ids=[2, 3], seed=3)
    full = PersonaExperts(mlp, r=4, alpha=8.0, dropout=0.0, expert_ids=[0, 1, 2, 3], seed=3)
    assert torch.equal(fresh.lora[0].gate_A, full.lora[2].gate_A)  # same global id -> same init
    assert (full.lora[0].gate_B == 0).all() and full.lora[0].gate_A.abs().max() <= 1 / 32**0.5
