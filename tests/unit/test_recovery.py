"""Mobility recovery: masking never leaks the target, mixing weights, baselines and evaluation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from nextlocmoe.config import Config
from nextlocmoe.data.store import TrajectoryDataset, collate
from nextlocmoe.eval.evaluate import evaluate_model
from nextlocmoe.model.build import build_model
from nextlocmoe.model.io import data_info_from_dir
from nextlocmoe.model.loss import compute_loss
from nextlocmoe.tokens.evaluation import task_batch
from nextlocmoe.tokens.recovery import eval_positions, mask_batch, mix_recovery, recovery_baselines
from nextlocmoe.tokens.rqvae import TokenizerSettings, tokenize

FAST = dict(levels=2, codebook=4, d_code=8, hidden=16, epochs=2, batch_size=64, kmeans_iters=2)


def test_eval_positions_are_interior_and_fixed() -> None:
    p = eval_positions(np.arange(1000), 5)
    assert p.min() == 0 and p.max() == 3 and np.array_equal(p, eval_positions(np.arange(1000), 5))
    assert len(np.unique(p)) == 4


@pytest.fixture
def qt_setup(prepared_fsq, debug_cfg: Config):
    tokenize(prepared_fsq, TokenizerSettings(**FAST))
    tk = dataclasses.replace(
        debug_cfg.model.tokens, enabled=True, gen_head=True, recovery=True, beam=4,
        codes_path=str(prepared_fsq / "location_codes.json"),
    )  # fmt: skip
    cfg = dataclasses.replace(debug_cfg, model=dataclasses.replace(debug_cfg.model, tokens=tk))
    torch.manual_seed(0)
    return prepared_fsq, build_model(cfg.model, data_info_from_dir(prepared_fsq)).eval(), cfg


def test_masking_never_leaks_the_target(qt_setup) -> None:
    data, model, _ = qt_setup
    ds = TrajectoryDataset(data, "test", pointer=256)
    batch = collate(ds.get_batch(np.arange(len(ds))))
    B, C = batch["cur_loc"].shape
    pos = eval_positions(batch["sample_index"].numpy(), C).astype(np.int64)
    rows = torch.arange(B)
    rec = task_batch(batch, "recovery")
    assert torch.equal(rec["target_loc"], batch["cur_loc"][rows, pos])
    assert torch.equal(rec["target_xy"], batch["cur_xy"][rows, pos])
    m = rec["cur_masked"]
    assert m.sum(1).eq(1).all() and m[rows, pos].all()
    assert (rec["cur_loc"][m] == -1).all() and (rec["cur_xy"][m] == 0).all()
    assert (model.qtmob.codes_of(rec["cur_loc"])[m] == -1).all()  # no code ids of the masked record
    # a batch that differs only in the masked records' location gives identical inputs and outputs
    other = {k: v.clone() for k, v in batch.items()}
    n_loc = model.qtmob.loc_codes.shape[0]
    other["cur_loc"][rows, pos] = (batch["cur_loc"][rows, pos] + 1) % n_loc
    other["cur_xy"][rows, pos] = batch["cur_xy"][rows, pos] + 3.0
    slot = batch["ptr_loc"].shape[1] - C + pos  # the same records in the pointer window
    assert torch.equal(batch["ptr_loc"][rows, slot], batch["cur_loc"][rows, pos])
    other["ptr_loc"][rows, slot] = other["cur_loc"][rows, pos]
    other["ptr_xy"][rows, slot] = other["cur_xy"][rows, pos]
    rec2 = task_batch(other, "recovery")
    names = (*model.input_names, "cur_masked")
    assert "ptr_loc" in names
    for k in names:
        assert torch.equal(rec[k], rec2[k]), k
    inputs = {k: rec[k] for k in names}
    inputs2 = {k: rec2[k] for k in names}
    with torch.no_grad():
        p1, p2 = model(inputs)[0], model(inputs2)[0]
    assert (
        torch.equal(p1.xy, p2.xy) and torch.equal(p1.scores, p2.scores) and torch.equal(p1.hidden, p2.hidden)
    )
    # the target's own location/coordinates appear in no input slot of its record
    t = rec["target_loc"]
    assert not (rec["cur_loc"][rows, pos] == t).any()


def test_mix_recovery_weights_the_two_tasks(qt_setup) -> None:
    data, model, cfg = qt_setup
    ds = TrajectoryDataset(data, "train", pointer=256)
    batch = collate(ds.get_batch(np.arange(min(8, len(ds)))))
    B = batch["cur_loc"].shape[0]
    mixed = mix_recovery(batch, 2, 1.0, 0.5, seed=3)
    assert mixed["cur_loc"].shape[0] == 2 * B and mixed["cur_masked"][:B].sum() == 0
    assert (
        mixed["cur_masked"][B:].sum(1).eq(2).all()
        and (mixed["cur_loc"][B:][mixed["cur_masked"][B:]] == -1).all()
    )
    assert torch.isclose(mixed["sample_weight"].sum(), torch.tensor(1.5))
    model.train()
    pred, aux = model(mixed)
    parts = compute_loss(pred, aux, mixed, cfg.loss, 1000.0)
    d = torch.sqrt((((pred.xy - mixed["target_xy"]) * 1000.0) ** 2).sum(-1) + 1e-6)
    assert torch.isclose(parts.distance_m, d[:B].mean() + 0.5 * d[B:].mean(), rtol=1e-5)
    parts.total.backward()
    assert model.qtmob.mask_emb.grad.abs().sum() > 0
    model.eval()


def test_recovery_evaluation_and_baselines(qt_setup) -> None:
    data, model, _ = qt_setup
    rep = evaluate_model(model, data, "test", batch_size=16, ranking="codes", task="recovery")
    assert rep["task"] == "recovery" and set(rep["rankings"]) == {"point", "scored", "codes"}
    n = rep["n"]
    assert n == len(TrajectoryDataset(data, "test", pointer=256))
    for name in ("markov", "user_frequency", "global_popularity"):
        m = rep["baselines"][name]
        assert m["n"] == n and 0 <= m["hit@1"] <= m["hit@5"] <= m["hit@10"] <= 1
    nxt = evaluate_model(model, data, "test", batch_size=16, ranking="codes")
    assert "task" not in nxt and nxt["n"] == n and "codes" in nxt["rankings"]
    assert recovery_baselines(data, "test", max_samples=2)["markov"]["n"] == 2
    b = collate(TrajectoryDataset(data, "test", pointer=256).get_batch([0]))
    assert task_batch(b, "next") is b
    with pytest.raises(ValueError):
        task_batch(b, "nope")
    assert mask_batch(b, np.array([[0]]))["cur_masked"][0, 0]
