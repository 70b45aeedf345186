"""Mixed precision (model/precision.py, issue 18): DeepSpeed bf16 casts the parameters, never the batch.

The model must take the fp32 batch, run its trunk in bf16, and keep routers, heads and the loss in fp32."""

from __future__ import annotations

import pytest
import torch

from nextlocmoe.config import Config
from nextlocmoe.model.build import build_model
from nextlocmoe.model.loss import compute_loss
from nextlocmoe.model.nextlocmoe import DataInfo
from nextlocmoe.model.precision import cast_parameters  # as DeepSpeed 0.19.8 bf16: params, not buffers
from tests.unit.conftest import random_batch

L = 50


@pytest.fixture(scope="module")
def bf16_model(debug_cfg: Config):
    torch.manual_seed(0)
    m = build_model(debug_cfg.model, DataInfo(torch.randn(L, 2), 1000.0))
    cast_parameters(m, torch.bfloat16)
    return m


def test_bf16_parameters_take_the_fp32_batch(bf16_model, debug_cfg: Config) -> None:
    """The step-1 crash of the first bf16 launch ("expected m1 and m2 to have the same dtype")."""
    batch = random_batch(L=L)
    assert batch["hist_xy"].dtype == torch.float32
    pred, aux = bf16_model(batch)
    parts = compute_loss(pred, aux, batch, debug_cfg.loss, 1000.0)
    assert parts.total.dtype == torch.float32 and torch.isfinite(parts.total)
    parts.total.backward()
    for name in ("heads.xy.weight", "rec.loc.weight", "proj_cur.weight", "scored.slot_in.weight"):
        p = bf16_model.get_parameter(name)
        assert p.dtype == torch.bfloat16 and p.grad is not None and torch.isfinite(p.grad).all(), name
    bf16_model.zero_grad(set_to_none=True)


def test_heads_and_routers_compute_in_fp32(bf16_model) -> None:
    """A bf16 coordinate head quantises the point to the bf16 grid (~80-160 m at NYC scale)."""
    with torch.no_grad():
        pred, aux = bf16_model(random_batch(B=16, L=L, seed=3))
    assert pred.xy.dtype == pred.dur.dtype == pred.scores.dtype == torch.float32
    off_grid = pred.xy != pred.xy.bfloat16().float()  # fp32 results are almost never bf16-representable
    assert off_grid.float().mean() > 0.5, pred.xy
    assert all(a.probs_TE.dtype == torch.float32 for a in aux.personal)
    assert aux.semantic.probs_TE.dtype == torch.float32
    assert all(a.w_TK.dtype == torch.float32 for a in [*aux.personal, aux.semantic])


def test_bf16_forward_tracks_fp32(debug_cfg: Config) -> None:
    """Same weights (rounded to bf16) in an fp32 model and a bf16 one: the scores agree closely, so the
    casts are in the right places (a wrong dtype path would either crash or drift far)."""
    torch.manual_seed(0)
    m32 = build_model(debug_cfg.model, DataInfo(torch.randn(L, 2), 1000.0)).eval()
    cast_parameters(m32, torch.bfloat16)
    m16 = m32
    batch = random_batch(B=8, L=L, seed=5)
    with torch.no_grad():
        p16, _ = m16(batch)
        cast_parameters(m32, torch.float32)  # the same bf16-rounded values, now fp32
        p32, _ = m32(batch)
    assert (p16.xy - p32.xy).abs().max() < 0.05
    top16, top32 = p16.scores.topk(5).indices, p32.scores.topk(5).indices
    assert (top16[:, 0] == top32[:, 0]).float().mean() >= 0.75


@pytest.mark.parametrize("mode", ["grouped", "static"])
def test_combine_weights_and_the_sum_over_experts_are_fp32(mode: str) -> None:
    """Issue 18 item 4: under bf16 the combine weights were cast to bf16 before weighting. With an fp32
    combine, weights that differ below bf16's resolution still change the (bf16) output; with a bf16
    combine they could not (w and bf16(w) would give identical outputs)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from nextlocmoe.model.experts import PersonaExperts

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=128))
    ex = PersonaExperts(mlp, r=4, alpha=4, dropout=0.0, expert_ids=list(range(4)), seed=0).eval()
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.2)
    cast_parameters(ex, torch.bfloat16)
    x = torch.randn(256, 64).bfloat16()
    ids = torch.stack([torch.randperm(4)[:3] for _ in range(256)])
    w = torch.rand(256, 3) * 0.5 + 0.25
    w_rounded = w.bfloat16().float()
    assert not torch.equal(w, w_rounded)
    with torch.no_grad():
        y, y_rounded = ex(x, ids, w, mode), ex(x, ids, w_rounded, mode)
    assert y.dtype == torch.bfloat16
    assert (y != y_rounded).float().mean() > 0.05  # the fp32 weights reach the output
