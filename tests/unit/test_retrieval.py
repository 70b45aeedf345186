"""Candidate retrieval then scoring (model/candidates.py, model/retrieval.py): tables match brute force,
dedupe keeps one entry per place with the summed copy mass, the mixture is a distribution over the
candidates, training is a sampled softmax with leave-one-out counts and evaluation never reads the target,
candidate ranks agree with full ranks, no parameter has a place dimension, the head exports with parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nextlocmoe.config import ConfigError, load_config
from nextlocmoe.eval.evaluate import score_ranks
from nextlocmoe.model.candidates import candidate_ranks, dedupe, near_table, retrieval_tables
from nextlocmoe.model.loss import scored_nll
from nextlocmoe.model.retrieval import RetrievalPointerHead
from tests.unit.test_novelty import KEYS, _records
from tests.unit.test_pointer import _routine_batch, _uniform_routing

L, P, D = 40, 24, 16


def _head(seed: int = 0, records: dict | None = None, in_batch: bool = True) -> RetrievalPointerHead:
    torch.manual_seed(seed)
    b = _routine_batch(2, 0, L=L, P=P)
    tables = retrieval_tables(b["xy_L2"].numpy(), records if records is not None else _records(), 6, 4, 3)
    return RetrievalPointerHead(D, b["xy_L2"], tables, 8, 4, 5, 1000.0, True, in_batch)


def _run(head: RetrievalPointerHead, b: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    pi, om = _uniform_routing(len(b["ptr_loc"]))
    h = torch.randn(len(b["ptr_loc"]), D, generator=torch.Generator().manual_seed(seed))
    return head(h, b["cur_xy"][:, -1], b, pi, om)


def test_near_table_and_successors_match_brute_force() -> None:
    xy = np.random.default_rng(0).normal(size=(L, 2))
    near = near_table(xy, 5)
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    assert np.array_equal(near[:, 0], np.arange(L))
    assert np.array_equal(np.sort(near, 1), np.sort(np.argsort(d, 1, kind="stable")[:, :5], 1))
    assert (near_table(xy[:3], 5)[:, 3:] == -1).all()  # fewer places than k: padding
    r = _records()
    t = retrieval_tables(xy, r, 5, 4, 3)
    tr = r["split"] == 0
    assert np.array_equal(t.visits_L, np.bincount(r["loc"][tr], minlength=L))
    assert np.array_equal(t.popular_N, np.argsort(-t.visits_L, kind="stable")[:3])
    assert ((t.succ_LK >= 0) == (t.succ_cnt_LK > 0)).all()  # padding is -1, never place 0


def test_dedupe_keeps_first_occurrence_and_sums_weights() -> None:
    ids = torch.tensor([[3, 1, 3, -1, 1, 2], [-1, -1, 5, 5, 5, 0]])
    w = torch.tensor([[0.1, 0.2, 0.3, 0.9, 0.4, 0.0], [0.5, 0.5, 0.2, 0.2, 0.1, 0.0]])
    out, ws = dedupe(ids, w)
    assert out.tolist() == [[3, 1, -1, -1, -1, 2], [-1, -1, 5, -1, -1, 0]]
    assert torch.allclose(ws, torch.tensor([[0.4, 0.6, 0, 0, 0, 0], [0, 0, 0.5, 0, 0, 0]]))


def test_mixture_is_a_distribution_over_unique_candidates() -> None:
    head = _head().eval()
    b = _routine_batch(8, 3, L=L, P=P)
    b["ptr_loc"][0, :5] = -1
    logp, cand = _run(head, b)
    assert logp.shape == cand.shape == (8, P + head.index.width)
    assert torch.allclose(logp.exp().sum(1), torch.ones(8), atol=1e-4)
    for row in cand:
        kept = row[row >= 0]
        assert len(kept) == len(set(kept.tolist()))
    assert (logp[cand < 0] <= -1e3).all()
    for i in range(8):  # every valid pointer place and the retrieved ones are candidates
        want = set(b["ptr_loc"][i][b["ptr_loc"][i] >= 0].tolist()) | set(head.index.popular_N.tolist())
        assert want <= set(cand[i].tolist())


def test_training_appends_targets_and_evaluation_never_reads_them() -> None:
    head = _head()
    b = _routine_batch(6, 4, L=L, P=P)
    far = torch.tensor([(int(t) + 17) % L for t in b["target_loc"]])
    b["target_loc"] = far
    head.train()
    logp, cand = _run(head, b)
    assert (cand == far.unsqueeze(1)).any(1).all()  # sampled softmax: the target is always a candidate
    assert set(far.tolist()) <= set(cand[0].tolist())  # in-batch negatives
    assert torch.isfinite(scored_nll(logp, cand, far)).all()
    head.eval()
    ref = _run(head, b)
    b2 = dict(b, target_loc=(far + 1) % L)
    got = _run(head, b2)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_training_counts_are_leave_one_out() -> None:
    r = _records()
    head = _head(records=r).train()
    b = _routine_batch(4, 5, L=L, P=P)
    h = torch.randn(4, D)
    cand = head.index.retrieve(b, b["target_loc"])
    cand, _ = dedupe(cand)
    with torch.no_grad():
        head.count_w.bias.copy_(torch.tensor([1.0, 0.0]))
        head.log_beta.fill_(-30.0)
        loo = head.candidate_gen(h, cand, b["cur_xy"][:, -1], b, b["target_loc"])
        full = head.candidate_gen(h, cand, b["cur_xy"][:, -1], b, None)
    is_t = cand == b["target_loc"].unsqueeze(1)
    v = head.index.visits_L[cand.clamp_min(0)]
    assert torch.allclose(loo[~is_t], full[~is_t])
    want = torch.log1p((v - 1).clamp_min(0))[is_t]
    assert torch.allclose(loo[is_t], want, atol=1e-5)


def test_candidate_ranks_agree_with_full_ranks() -> None:
    g = torch.Generator().manual_seed(0)
    scores_BL = torch.randn(5, L, generator=g).round(decimals=1)  # ties
    target = torch.randint(0, L, (5,), generator=g)
    cand = torch.stack([torch.randperm(L, generator=g) for _ in range(5)])
    cand[:, -3:] = -1
    cand[0, 0], cand[0, -1] = target[0], -1
    cand[1] = torch.where(cand[1] == target[1], torch.full_like(cand[1], -1), cand[1])  # target outside
    scores_BC = torch.where(cand >= 0, scores_BL.gather(1, cand.clamp_min(0)), torch.full(cand.shape, -1e4))
    ranks, inside = candidate_ranks(scores_BC.float(), cand, target, L)
    ref = score_ranks(torch.where(_member(cand, L), scores_BL, torch.full_like(scores_BL, -1e4)), target)
    assert inside.tolist() == [(cand[i] == target[i]).any().item() for i in range(5)] and not inside[1]
    assert ranks[1] == L and torch.equal(ranks[inside], ref[inside])


def _member(cand: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(len(cand), n, dtype=torch.bool)
    for i, row in enumerate(cand):
        out[i, row[row >= 0]] = True
    return out


def test_no_parameter_has_a_place_dimension() -> None:
    small, big = _head(), None
    b = _routine_batch(2, 0, L=400, P=P)
    tables = retrieval_tables(b["xy_L2"].numpy(), None, 6, 4, 3)
    big = RetrievalPointerHead(D, b["xy_L2"], tables, 8, 4, 5, 1000.0)
    shapes = lambda m: {k: tuple(p.shape) for k, p in m.named_parameters()}  # noqa: E731
    assert shapes(small) == shapes(big)
    assert not any(k.startswith("index.") for k in big.state_dict())  # tables are rebuilt, not saved


def test_config_validates_retrieval() -> None:
    cfg = load_config(None, ["model.heads.pointer=true", "model.heads.retrieval=true"])
    assert cfg.model.heads.retrieval
    with pytest.raises(ConfigError):
        load_config(None, ["model.heads.retrieval=true", "model.heads.pointer=false"])
    with pytest.raises(ConfigError):
        load_config(
            None, ["model.heads.pointer=true", "model.heads.retrieval=true", "model.heads.retrieval_near=0"]
        )


class _HeadGraph(nn.Module):
    def __init__(self, head: RetrievalPointerHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, pred, pi, om = xs[:4]
        return self.head(h, pred, dict(zip(KEYS, xs[4:], strict=True)), pi, om)


def test_retrieval_head_exports_with_parity(tmp_path: Path) -> None:
    from export.onnx_io import OrtSession, export_onnx

    m = _HeadGraph(_head().eval()).eval()

    def inputs(n: int, seed: int) -> tuple[torch.Tensor, ...]:
        b = _routine_batch(n, seed, L=L, P=P)
        b["ptr_loc"][0, :5] = -1
        pi, om = _uniform_routing(n)
        g = torch.Generator().manual_seed(seed)
        xs = (torch.randn(n, D, generator=g), b["cur_xy"][:, -1], pi, om, *(b[k] for k in KEYS))
        return tuple(x.clone() for x in xs)

    names = ("h", "pred", "pi", "om", *KEYS)
    res = export_onnx(m, inputs(3, 0), tmp_path / "ret.onnx", names, ("logp", "cand"))
    sess = OrtSession(res.path)
    for n in (1, 4):
        xs = inputs(n, 10 + n)
        with torch.no_grad():
            ref_p, ref_c = (t.numpy() for t in m(*xs))
        got = sess.run({k: v.numpy() for k, v in zip(names, xs, strict=True)})
        assert np.array_equal(got["cand"], ref_c)
        assert np.abs(np.exp(got["logp"]) - np.exp(ref_p)).max() < 1e-5


def test_evaluation_batch_fits_memory_at_any_place_count() -> None:
    from nextlocmoe.eval.evaluate import SCORE_BUDGET_ELEMS, memory_batch

    full = nn.Module()
    full.scored = nn.Linear(1, 1)  # a head that scores every place (no candidate index)
    assert memory_batch(full, 256, 5_000) == 256
    assert memory_batch(full, 256, 1_000_000) == SCORE_BUDGET_ELEMS // 1_000_000 < 256
    assert memory_batch(full, 256, 10**9) == 1
    retrieval = nn.Module()
    retrieval.scored = _head()
    assert memory_batch(retrieval, 256, 1_000_000) == 256  # no [B, L] tensor: the batch is kept


def test_whole_model_trains_in_bf16_with_the_retrieval_head() -> None:
    """The debug model with ``model.heads.retrieval`` under DeepSpeed's bf16 rule (parameters cast, the
    batch and buffers fp32): finite fp32 loss and gradients, fp32 candidate scores, tables unchanged."""
    from nextlocmoe.model.build import build_model
    from nextlocmoe.model.loss import compute_loss
    from nextlocmoe.model.nextlocmoe import DataInfo
    from nextlocmoe.model.precision import cast_parameters
    from tests.unit.conftest import ROOT, random_batch

    cfg = load_config(ROOT / "configs" / "debug.yaml", ["model.heads.retrieval=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model, DataInfo(torch.randn(50, 2), 1000.0, records=_records()))
    cast_parameters(model, torch.bfloat16)
    assert model.scored.index.visits_L.dtype == torch.float32  # buffers keep their dtype
    batch = random_batch(B=6, L=50)
    pred, aux = model.train()(batch)
    assert pred.scores.dtype == torch.float32 and pred.cand.shape == pred.scores.shape
    parts = compute_loss(pred, aux, batch, cfg.loss, 1000.0)
    assert torch.isfinite(parts.total) and parts.scored > 0
    parts.total.backward()
    g = model.scored.count_w.weight.grad
    assert g is not None and torch.isfinite(g).all()
    with torch.no_grad():
        pred_eval, _ = model.eval()(batch)
    assert pred_eval.cand.shape[1] == pred.cand.shape[1] - 1 - 6  # no target, no in-batch negatives


def test_an_unknown_current_place_retrieves_no_neighbours_and_no_transitions() -> None:
    head = _head()
    b = _routine_batch(3, 6, L=L, P=P)
    b["cur_loc"] = b["cur_loc"].clone()
    b["cur_loc"][0, -1] = -1
    cand = head.index.retrieve(b)
    kn, kt = head.index.near_LK.shape[1], head.index.succ_LK.shape[1]
    assert (cand[0, P : P + kn + kt] == -1).all() and (cand[1, P : P + kn] >= 0).all()
    ids = torch.arange(L).expand(3, L)
    trans = head.index.transitions(ids, b["cur_loc"][:, -1].long())
    assert (trans[0] == 0).all()  # not place 0's successors
    assert torch.equal(trans[1], head.index.transitions(ids[1:2], b["cur_loc"][1:2, -1].long())[0])
