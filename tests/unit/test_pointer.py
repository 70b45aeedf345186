"""History identity (docs/MODEL_QUALITY.md): no input of a sample sees its target's location or anything
after it; the pointer's slot scoring is id-free; the mixture is a distribution; the online baselines count
only records before the target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextlocmoe.data.store import POINTER_KEYS, TrajectoryDataset, collate
from nextlocmoe.eval.baselines import BaselineModel, _load_records
from nextlocmoe.model.io import data_info_from_dir
from nextlocmoe.model.nextlocmoe import build_model
from nextlocmoe.model.pointer import slot_features
from tests.unit.conftest import random_batch

P = 16


def _inputs(ds: TrajectoryDataset, i: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    b = ds.get_batch([i])
    return {k: b[k] for k in names}


def _altered(ds: TrajectoryDataset, rows: np.ndarray, seed: int = 0) -> None:
    """Give records `rows` other locations (and coordinates) and other times in the dataset's columns."""
    cols = {k: np.array(v) for k, v in ds.cols.items()}
    rng = np.random.default_rng(seed)
    other = (cols["loc"][rows] + 1 + rng.integers(0, 3, len(rows))) % (cols["loc"].max() + 1)
    cols["loc"][rows] = other
    cols["x"][rows] += 5000.0
    cols["y"][rows] -= 3000.0
    cols["hour"][rows] = (cols["hour"][rows] + 7) % 24
    cols["t_min"][rows] += 10_000
    ds._cols = cols


@pytest.mark.parametrize("split", ["train", "test"])
def test_no_input_sees_the_target_location_or_later_records(prepared_fsq, debug_cfg, split) -> None:
    model = build_model(debug_cfg.model, data_info_from_dir(prepared_fsq))
    names = model.input_names
    assert set(POINTER_KEYS) <= set(names)
    ds = TrajectoryDataset(prepared_fsq, split, pointer=P)
    for i in range(len(ds)):
        r = int(ds.samples[i])
        before = _inputs(ds, i, names)
        user = ds.cols["user"]
        later = np.flatnonzero((user == user[r]) & (np.arange(len(user)) > r))
        _altered(ds, later)  # everything after the target: no input may change
        assert all(np.array_equal(before[k], v) for k, v in _inputs(ds, i, names).items())
        # the target's own location/coordinates: no input changes (its time is the query time, by design)
        ds._cols = None
        cols = {k: np.array(v) for k, v in ds.cols.items()}
        cols["loc"][r] = (cols["loc"][r] + 1) % (cols["loc"].max() + 1)
        cols["x"][r] += 5000.0
        ds._cols = cols
        after = _inputs(ds, i, names)
        assert all(np.array_equal(before[k], after[k]) for k in names), i
        ds._cols = None


def test_pointer_window_is_the_records_right_before_the_target(prepared_fsq) -> None:
    ds = TrajectoryDataset(prepared_fsq, "test", pointer=P)
    b = ds.get_batch(np.arange(len(ds)))
    loc, t = np.asarray(ds.cols["loc"]), np.asarray(ds.cols["t_min"])
    for row, r in enumerate(np.asarray(ds.samples)):
        first = r - int(ds.cols["pos"][r])
        j = np.arange(r - P, r)
        ok = j >= first
        assert np.array_equal(b["ptr_loc"][row][ok], loc[j[ok]]) and (b["ptr_loc"][row][~ok] == -1).all()
        assert np.array_equal(b["ptr_loc"][row][-ds.current :], b["cur_loc"][row])
        assert np.allclose(b["ptr_age_h"][row][ok], (t[r - 1] - t[j[ok]]) / 60.0)
        assert b["query_gap_h"][row] == pytest.approx((t[r] - t[r - 1]) / 60.0)


def test_slot_features_are_id_free() -> None:
    """Relabelling every location id (a permutation) leaves the slot features unchanged."""
    b = random_batch(B=3, H=10, C=5, L=30)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    b2 = dict(b)
    for k in ("ptr_loc", "cur_loc"):
        b2[k] = torch.where(b[k] >= 0, perm[b[k].clamp_min(0)], b[k])
    assert torch.equal(slot_features(b, 1000.0, True), slot_features(b2, 1000.0, True))
    b2["cur_loc"] = b["cur_loc"].roll(1, dims=1)  # another current place: the features must change
    assert not torch.equal(slot_features(b, 1000.0, True), slot_features(b2, 1000.0, True))


def test_pointer_scores_are_log_probabilities_and_copy_needs_a_slot(prepared_fsq, debug_cfg) -> None:
    torch.manual_seed(0)
    model = build_model(debug_cfg.model, data_info_from_dir(prepared_fsq)).eval()
    ds = TrajectoryDataset(prepared_fsq, "test", pointer=model.pointer_window)
    batch = collate(ds.get_batch(np.arange(len(ds))))
    with torch.no_grad():
        pred, _ = model(batch)
        p = pred.scores.exp()
        assert torch.allclose(p.sum(1), torch.ones(len(p)), atol=1e-4)
        only_gen = dict(batch, ptr_loc=torch.full_like(batch["ptr_loc"], -1))
        p_gen = model(only_gen)[0].scores.exp()  # no slots: the gate closes, only the generator is left
    seen = torch.zeros_like(p, dtype=torch.bool).scatter_(1, batch["ptr_loc"].clamp_min(0), True)
    seen &= (batch["ptr_loc"] >= 0).any(1, keepdim=True)
    assert (p[seen].sum() / p.sum()) > (p_gen[seen].sum() / p_gen.sum())  # copying puts mass on history


def test_online_baselines_count_only_earlier_records(prepared_fsq) -> None:
    rec = _load_records(prepared_fsq)
    n_loc = int(rec["loc"].max()) + 1
    r = np.load(prepared_fsq / "samples_test.npy")
    counts, recency, trans = BaselineModel(rec, n_loc, 9).online_counts(r)
    for row, t in enumerate(r):
        first = t - rec["pos"][t]
        assert counts[row].sum() == t - first  # every earlier record of the user, nothing else
        assert np.array_equal(counts[row], np.bincount(rec["loc"][first:t], minlength=n_loc))
        assert recency[row][rec["loc"][t - 1]] >= 1.0  # the last input record has weight decay**0
    for row, t in enumerate(r[:8]):  # alter the target and every later record: its counts must not move
        rec2 = {k: v.copy() for k, v in rec.items()}
        later = (rec["user"] == rec["user"][t]) & (np.arange(len(rec["loc"])) >= t)
        rec2["loc"][later] = (rec2["loc"][later] + 1) % n_loc
        again = BaselineModel(rec2, n_loc, 9).online_counts(np.array([t]))
        for a, b in zip((counts, recency, trans), again, strict=True):
            assert np.array_equal(a[row], b[0])
