"""scripts/explore_ranker.py (issue 23's third pass) on the tiny prepared store: its novel flag is the
evaluation's, its tables count the TRAIN split only, and a sample's features come from its window and the
tables, never from its target or anything after it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nextlocmoe.eval.slices import sample_slices

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
explore_ranker = pytest.importorskip("explore_ranker")


def test_novel_flag_is_the_evaluation_slice(prepared_fsq: Path) -> None:
    loc = np.load(prepared_fsq / "records" / "loc.npy").astype(np.int64)
    user = np.load(prepared_fsq / "records" / "user.npy")
    novel = explore_ranker.novel_records(loc, user)
    for split in ("train", "valid", "test"):
        S = np.load(prepared_fsq / f"samples_{split}.npy").astype(np.int64)
        assert np.array_equal(novel[S], sample_slices(prepared_fsq, split)["novel"]), split


def test_tables_count_the_train_split_only(prepared_fsq: Path, tmp_path: Path) -> None:
    """Give every valid and test record the place (and coordinates) of a random train record: no count
    table may change (place coordinates are attributes of the places, not counts, and are left out)."""
    t = explore_ranker.tables(str(prepared_fsq))
    other = tmp_path / "moved"
    shutil.copytree(prepared_fsq, other)
    split = np.load(other / "records" / "split.npy")
    held, train = np.flatnonzero(split != 0), np.flatnonzero(split == 0)
    src = np.random.default_rng(0).choice(train, len(held))
    for col in ("loc", "x", "y"):
        a = np.load(other / "records" / f"{col}.npy")
        a[held] = a[src]
        np.save(other / "records" / f"{col}.npy", a)
    t2 = explore_ranker.tables(str(other))
    assert not np.array_equal(t["loc"], t2["loc"])
    for k in ("cos", "pop", "pop_h", "users", "T", "T2", "ph", "pop_first", "TN", "UU", "U"):
        assert np.array_equal(t[k], t2[k]), k


def test_features_of_a_sample_come_from_its_window(prepared_fsq: Path) -> None:
    t = explore_ranker.tables(str(prepared_fsq))
    S = np.load(prepared_fsq / "samples_test.npy").astype(np.int64)
    r = int(S[len(S) // 2])
    X, vis = explore_ranker.features(t, r)
    assert X.shape == (t["L"], len(explore_ranker.NAMES)) and np.isfinite(X).all()
    lo = max(r - t["pos"][r], r - explore_ranker.WINDOW)
    assert set(np.flatnonzero(vis)) == set(t["loc"][lo:r].tolist())
    c = explore_ranker.candidates(X, vis)  # every unvisited place (L < N_CAND), then -1 padding
    assert (
        set(c[c >= 0].tolist()) == set(np.flatnonzero(~vis).tolist())
        and (c[len(c) - vis.sum() :] == -1).all()
    )
    t["loc"] = t["loc"].copy()
    t["loc"][r:] = 0  # the target and every later record: the features must not move
    X2, vis2 = explore_ranker.features(t, r)
    assert np.array_equal(vis, vis2) and np.array_equal(X, X2)


def test_hits_count_a_target_outside_the_candidates_as_a_miss() -> None:
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    Y = torch.tensor([0, 0, -1])
    h = explore_ranker.hits(scores, Y, ks=(1, 3))
    assert h[1] == pytest.approx(1 / 3) and h[3] == pytest.approx(2 / 3)


def test_a_learned_ranker_finds_the_signal_and_never_ranks_padding() -> None:
    g = torch.Generator().manual_seed(0)
    S, C, nf = 1024, 12, len(explore_ranker.NAMES)
    X = torch.randn(S, C, nf, generator=g)
    Y = torch.randint(0, C - 2, (S,), generator=g)
    X[torch.arange(S), Y, 3] += 5.0  # the target stands out on one feature
    ids = np.tile(np.arange(C), (S, 1))
    ids[:, -2:] = -1  # padding candidates, given the strongest signal of all
    X[:, -2:, 3] += 8.0
    for hidden in (0, 32):
        model = explore_ranker.train_ranker(X, Y, ids, hidden)
        with torch.no_grad():
            s = explore_ranker.masked(model(X), ids)
        assert explore_ranker.hits(s, Y, ks=(1,))[1] > 0.9, hidden
        assert torch.isinf(s[:, -2:]).all() and (s.argmax(1) < C - 2).all()
