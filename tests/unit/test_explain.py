"""Routing report (nextlocmoe/eval/explain.py): every number of summary.json recomputed from the raw routing
arrays by independent code; plots written; the raw arrays are the model's own RoutingAux outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from nextlocmoe.eval import explain as ex
from nextlocmoe.eval.plots import write_plots

N, H, C, PN, EP, ES, K = 12, 6, 3, 4, 4, 5, 2
S = PN + H + C


def _topk(p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    return ids, np.take_along_axis(p, ids, -1)


@pytest.fixture(scope="module")
def raw() -> dict:
    rng = np.random.default_rng(0)
    per_p = [rng.dirichlet(np.ones(EP) * 0.7, size=(N, S)) for _ in range(2)]
    per_ids, per_w = zip(*[_topk(p, K) for p in per_p], strict=True)
    per_ids = list(per_ids)
    per_ids[1] = per_ids[1].copy()
    per_ids[1][:, :, 1] = np.where(rng.random((N, S)) < 0.3, -1, per_ids[1][:, :, 1])  # threshold routing
    per_w = [np.where(i >= 0, w, 0.0) for i, w in zip(per_ids, per_w, strict=True)]
    sem_p = rng.dirichlet(np.ones(ES), size=(N, C))
    sem_ids, sem_w = _topk(sem_p, 2)
    hist_mask = np.ones((N, H), bool)
    hist_mask[0, :3] = False
    return {
        "user": np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3]),
        "sample_index": np.arange(N),
        "cur_hour": rng.integers(0, 24, (N, C)),
        "cur_loc": rng.integers(0, 7, (N, C)),
        "hist_mask": hist_mask,
        "sem_probs": sem_p, "sem_ids": sem_ids, "sem_w": sem_w,
        "per_probs": per_p, "per_ids": per_ids, "per_w": per_w,
        "prompt_len": PN,
    }  # fmt: skip


CATS = np.array(
    ["Food", "Residence", "Travel & Transport", "", "College & University", "Nightlife Spot", "x"]
)


def _stats(p: np.ndarray, ids: np.ndarray, w: np.ndarray, E: int) -> dict:
    """Independent recomputation (loops, no shared helpers)."""
    load = np.zeros(E)
    ws = np.zeros(E)
    for row_i, row_w in zip(ids.reshape(-1, ids.shape[-1]), w.reshape(-1, w.shape[-1]), strict=True):
        for e, v in zip(row_i, row_w, strict=True):
            if e >= 0:
                load[e] += 1
                ws[e] += v
    load /= load.sum()
    pp = p.reshape(-1, E)
    return {
        "mean_prob": pp.mean(0),
        "load": load,
        "weight_share": ws / ws.sum(),
        "load_cv": np.std(load) / np.mean(load),
        "entropy": np.mean([-sum(x * np.log(x) for x in row) for row in pp]),
    }


def _js_user(mix: np.ndarray) -> float:
    m = mix.mean(0)
    return float(np.mean([jensenshannon(x, m, base=2) ** 2 for x in mix]))


def test_summary_recomputed_from_raw(raw) -> None:
    rep = ex.summarise(raw, "current", CATS, top_users=3)
    cur = slice(PN + H, S)
    for li in range(2):
        ref = _stats(raw["per_probs"][li][:, cur], raw["per_ids"][li][:, cur], raw["per_w"][li][:, cur], EP)
        got = rep["overall"]["persona"][li]
        for k, v in ref.items():
            assert np.allclose(got[k], v), (li, k)
        mixes = raw["per_probs"][li][:, cur].mean(1)
        stab = {u: _js_user(mixes[raw["user"] == u]) for u in range(4)}
        assert got["stability_js"] == pytest.approx(np.mean([stab[u] for u in range(3)]))  # user 3: 1 sample
        for u in range(4):
            sel = raw["user"] == u
            gu = rep["users"][str(u)]["persona"][li]
            assert gu["stability_js"] == pytest.approx(stab[u], abs=1e-12)
            ref_u = _stats(raw["per_probs"][li][sel][:, cur], raw["per_ids"][li][sel][:, cur],
                           raw["per_w"][li][sel][:, cur], EP)  # fmt: skip
            assert np.allclose(gu["mean_prob"], ref_u["mean_prob"]) and np.allclose(gu["load"], ref_u["load"])
    assert rep["users"]["3"]["persona"][0]["stability_js"] == 0.0
    fn = _stats(raw["sem_probs"], raw["sem_ids"], raw["sem_w"], ES)
    for k, v in fn.items():
        assert np.allclose(rep["overall"]["function"][k], v), k
    # function mix by hour
    fh = rep["function_by_hour"]
    for hr in range(24):
        sel = raw["cur_hour"] == hr
        assert fh["n_records"][hr] == sel.sum()
        if sel.any():
            assert np.allclose(fh["mean_prob"][hr], raw["sem_probs"][sel].mean(0))
            assert np.allclose(
                fh["top1_share"][hr], np.bincount(raw["sem_probs"][sel].argmax(-1), minlength=ES) / sel.sum()
            )
    # heatmap figure: top users by samples, mean router prob
    hm = rep["figures"]["persona_heatmap"]
    assert hm["users"] == [0, 2, 1] and hm["n_samples"] == [4, 4, 3]
    assert np.allclose(
        hm["layers"][1][1], raw["per_probs"][1][raw["user"] == 2][:, cur].reshape(-1, EP).mean(0)
    )
    assert rep["figures"]["expert_load"]["persona_layers"][0] == rep["overall"]["persona"][0]["load"]


def test_pools(raw) -> None:
    m = ex.token_mask(raw, "valid")
    assert m.sum() == N * S - 3 and not m[0, PN : PN + 3].any()
    assert ex.token_mask(raw, "last").sum(1).tolist() == [1] * N
    rep = ex.summarise(raw, "valid")
    assert np.allclose(rep["overall"]["persona"][0]["mean_prob"], raw["per_probs"][0][m].mean(0))
    with pytest.raises(ValueError):
        ex.token_mask(raw, "nope")


def test_category_agreement_and_references(raw) -> None:
    rep = ex.summarise(raw, "current", CATS, seed=3)
    agr = rep["category_agreement"]
    group = {
        "Food": 1,
        "Residence": 4,
        "Travel & Transport": 3,
        "College & University": 2,
        "Nightlife Spot": 0,
    }
    top = raw["sem_probs"].argmax(-1).reshape(-1)
    g = np.array([group.get(str(CATS[loc]), -1) for loc in raw["cur_loc"].reshape(-1)])
    ok = g >= 0
    assert agr["n_records"] == ok.sum() and agr["n_unmapped"] == (~ok).sum()
    assert agr["agreement"] == pytest.approx((top[ok] == g[ok]).mean())
    assert agr["random_uniform_expected"] == 0.2
    rnd = np.random.default_rng(3).integers(0, 5, size=ok.sum())
    assert agr["random_seeded"] == pytest.approx((rnd == g[ok]).mean())
    shares = np.bincount(g[ok], minlength=5) / ok.sum()
    assert agr["popularity_group"] == pytest.approx(shares.max())
    mode = np.bincount(top[ok], minlength=5).argmax()
    assert agr["popularity_model_expert"] == pytest.approx(shares[mode])
    assert np.asarray(agr["confusion_group_by_expert"]).sum() == ok.sum()
    assert set(agr["mapping"]) == {"Food", "Residence", "Travel & Transport", "College & University",
                                   "Nightlife Spot", "x"} and agr["mapping"]["x"] is None  # fmt: skip
    assert set(ex.CATEGORY_TO_FUNCTION.values()) == set(ex.FUNCTION_NAMES)
    assert "skipped" in ex.summarise(raw, "current", None)["category_agreement"]


def test_js_divergence_bounds() -> None:
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    q = np.array([[0.0, 1.0], [0.5, 0.5]])
    assert np.allclose(ex.js_divergence(p, q), [1.0, 0.0])


def test_plots_written(raw, tmp_path) -> None:
    rep = ex.summarise(raw, "current", CATS)
    files = write_plots(rep, tmp_path)
    assert set(files) == {"persona_heatmap", "function_by_hour", "expert_load", "category_confusion"}
    for f in files.values():
        data = (tmp_path / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    json.dumps(rep)  # summary.json-serialisable


def test_collect_routing_is_the_models_raw_aux(debug_cfg, prepared_fsq) -> None:
    from nextlocmoe.data.store import TrajectoryDataset, collate
    from nextlocmoe.model.build import build_model
    from nextlocmoe.model.io import data_info_from_dir

    torch.manual_seed(0)
    model = build_model(debug_cfg.model, data_info_from_dir(prepared_fsq)).eval()
    raw = ex.collect_routing(model, prepared_fsq, "train", max_samples=0, batch_size=5)
    ds = TrajectoryDataset(prepared_fsq, "train", pointer=model.pointer_window)
    n = len(ds)
    batch = collate(ds.get_batch(np.arange(n)))
    with torch.no_grad():
        _, aux = model(batch)
    Sx = len(model.prompt_ids) + ds.history + ds.current
    assert raw["prompt_len"] == len(model.prompt_ids)
    assert raw["sem_probs"].shape == (n, ds.current, 5)
    assert np.allclose(raw["sem_probs"].reshape(-1, 5), aux.semantic.probs_TE.numpy(), atol=1e-5)
    for li, a in enumerate(aux.personal):
        assert raw["per_probs"][li].shape == (n, Sx, a.probs_TE.shape[-1])
        assert np.allclose(raw["per_probs"][li].reshape(a.probs_TE.shape), a.probs_TE.numpy(), atol=1e-5)
        assert (raw["per_ids"][li].reshape(a.ids_TK.shape) == a.ids_TK.numpy()).all()
    assert (raw["user"] == batch["user"].numpy()).all()
