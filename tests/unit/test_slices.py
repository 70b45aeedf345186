"""Evaluation slices (nextlocmoe/eval/slices.py): repeat / novel and history length against a brute force
over the prepared store's records, and the per-slice metrics of model and baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nextlocmoe.eval.baselines import evaluate_baselines
from nextlocmoe.eval.slices import NOVEL_WINDOW, sample_slices, slice_report


def test_slices_match_a_brute_force(prepared_fsq: Path) -> None:
    for split in ("train", "test"):
        r = np.load(prepared_fsq / f"samples_{split}.npy")
        loc = np.load(prepared_fsq / "records" / "loc.npy")
        user = np.load(prepared_fsq / "records" / "user.npy")
        masks = sample_slices(prepared_fsq, split)
        for i, ri in enumerate(r):
            prev = [j for j in range(max(0, ri - NOVEL_WINDOW), ri) if user[j] == user[ri]]
            assert masks["repeat"][i] == (loc[ri] in loc[prev]), (split, i)
            n = sum(user[:ri] == user[ri])
            want = "history<64" if n < 64 else "history64-255" if n < 256 else "history>=256"
            assert masks[want][i] and sum(masks[k][i] for k in masks if k.startswith("history")) == 1
        assert (masks["repeat"] ^ masks["novel"]).all()


def test_slice_report_counts_and_metrics(prepared_fsq: Path) -> None:
    masks = sample_slices(prepared_fsq, "test")
    res, ref = evaluate_baselines(prepared_fsq, "test", progress=False)
    n = len(ref["target"])
    rep = slice_report(masks, {"scored": np.ones(n, dtype=np.int64)}, {b: v["ranks"] for b, v in res.items()})
    assert rep["repeat"]["n"] + rep["novel"]["n"] == n
    assert rep["repeat"]["model"]["scored"]["hit@1"] == 1.0 or rep["repeat"]["n"] == 0
    # a place the user never visited cannot be ranked first by the user's own visit counts
    if rep["novel"]["n"]:
        assert rep["novel"]["baselines"]["online_user_frequency"]["hit@1"] == 0.0


def test_exploration_baselines_rank_unvisited_places_first(prepared_fsq: Path) -> None:
    """explore_nearby / explore_markov put every place the user has not visited before the target above
    every visited one (so on novel targets they compete, on repeat targets they cannot score)."""
    from nextlocmoe.data.layout import RECORD_COLUMNS, load_locations
    from nextlocmoe.eval.baselines import BaselineModel, flat_ranges

    rec = {n: np.load(prepared_fsq / "records" / f"{n}.npy") for n in RECORD_COLUMNS}
    L = len(load_locations(prepared_fsq)["id"])
    model = BaselineModel(rec, L, 9, load_locations(prepared_fsq)["xy"])
    r = np.load(prepared_fsq / "samples_test.npy")
    keys = model.keys(r)
    first = r - rec["pos"][r]
    idx, own = flat_ranges(first, r - first)
    for i in range(len(r)):
        visited = set(rec["loc"][idx[own == i]].tolist())
        for name in ("explore_nearby", "explore_markov"):
            top = np.lexsort([-k[i] for k in reversed(keys[name])])[: L - len(visited)]
            assert not visited & set(top.tolist()), (name, i)


def test_routing_slices_are_the_slices_mean_mixes() -> None:
    from nextlocmoe.eval.slices import routing_slices

    rng = np.random.default_rng(0)
    N, S, E, C, Es = 10, 6, 4, 3, 5
    probs = rng.dirichlet(np.ones(E), (N, S))
    sem = rng.dirichlet(np.ones(Es), (N, C))
    mask = np.zeros((N, S), bool)
    mask[:, -C:] = True
    novel = np.arange(N) % 3 == 0
    out = routing_slices({"per_probs": [probs], "sem_probs": sem}, mask, {"repeat": ~novel, "novel": novel})
    assert out["novel"]["n"] == novel.sum() and out["repeat"]["n"] == (~novel).sum()
    want = probs[novel][:, -C:].mean(1).mean(0)
    assert np.allclose(out["novel"]["persona_mix"][0], want)
    assert np.allclose(out["repeat"]["function_mix"], sem[~novel].mean(1).mean(0))
    js = out["repeat_vs_novel_js"]
    assert 0 < js["persona"][0] < 1 and 0 < js["function"] < 1
    same = routing_slices({"per_probs": [probs], "sem_probs": None}, mask, {"repeat": novel, "novel": novel})
    assert same["repeat_vs_novel_js"]["persona"][0] == 0.0 and same["repeat_vs_novel_js"]["function"] is None
