"""History identity (docs/MODEL_QUALITY.md): no input of a sample sees its target's location or anything
after it; the pointer's slot scoring is id-free; the mixture is a distribution; the online baselines count
only records before the target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextlocmoe.data.store import POINTER_KEYS, TrajectoryDataset, collate
from nextlocmoe.eval.baselines import BaselineModel, _load_records
from nextlocmoe.model.build import build_model
from nextlocmoe.model.io import data_info_from_dir
from nextlocmoe.model.pointer import PointerScoredHead, slot_features
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


def _routine_batch(n: int, seed: int, L: int = 40, P: int = 24, C: int = 5) -> dict[str, torch.Tensor]:
    """Hand-made trajectories: each user repeats a routine a -> b -> c -> d (four places drawn afresh per
    user, so ids carry nothing), with a random other place after each `d`. The window ends on `b`, so the
    right next place is `c`, the place that followed `b` every time before; frequency ties a..d, and the
    most recent place before `b` is `a`: only the "follows the current place" signal gets it right."""
    g = torch.Generator().manual_seed(seed)
    xy_L2 = torch.randn(L, 2, generator=g)
    loc = torch.empty(n, P, dtype=torch.long)
    target = torch.empty(n, dtype=torch.long)
    for i in range(n):
        a, b, c, d, *others = torch.randperm(L, generator=g)[:10].tolist()
        seq: list[int] = []
        while len(seq) < P + 6:
            seq += [a, b, c, d, others[int(torch.randint(0, len(others), (1,), generator=g))]]
        end = max(k for k in range(P, len(seq)) if seq[k - 1] == b)  # the window ends on b
        loc[i], target[i] = torch.tensor(seq[end - P : end]), seq[end]
    return {
        "ptr_loc": loc,
        "ptr_xy": xy_L2[loc],
        "ptr_hour": torch.randint(0, 24, (n, P), generator=g),
        "ptr_weekday": torch.randint(0, 7, (n, P), generator=g),
        "ptr_age_h": torch.linspace(100.0, 0.0, P).expand(n, P).contiguous(),
        "cur_loc": loc[:, -C:],
        "cur_xy": xy_L2[loc[:, -C:]],
        "query_hour": torch.randint(0, 24, (n,), generator=g),
        "query_weekday": torch.randint(0, 7, (n,), generator=g),
        "query_gap_h": torch.rand(n, generator=g) * 3,
        "target_loc": target,
        "xy_L2": xy_L2,
    }


def _uniform_routing(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Persona weights pi [n, 4] and function weights omega [n, 5], uniform: routing plays no part here."""
    return torch.full((n, 4), 0.25), torch.full((n, 5), 0.2)


def _top1_hits(head: PointerScoredHead, b: dict[str, torch.Tensor], h_BD: torch.Tensor) -> float:
    pi, om = _uniform_routing(len(h_BD))
    with torch.no_grad():
        logp = head(h_BD, b["cur_xy"][:, -1], b, pi, om)
    return (logp.argmax(1) == b["target_loc"]).float().mean().item()


def test_pointer_learns_to_copy_the_place_that_followed_the_current_one() -> None:
    """The copy part on hand-made trajectories (see _routine_batch): trained on some users, it names the
    repeated earlier place `c` for new users with other ids (id-free), which recency or counts cannot."""
    torch.manual_seed(0)
    train, test = _routine_batch(256, seed=1), _routine_batch(128, seed=2)
    head = PointerScoredHead(16, train["xy_L2"], 8, 16, 4, 5, metres_per_unit=1.0)
    h_train, h_test = torch.randn(256, 16), torch.randn(128, 16)
    before = _top1_hits(head, test, h_test)
    opt = torch.optim.Adam(head.parameters(), lr=0.02)
    pi, om = _uniform_routing(256)
    for _ in range(40):
        logp = head(h_train, train["cur_xy"][:, -1], train, pi, om)
        loss = -logp.gather(1, train["target_loc"][:, None]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.loc_xy_L2.copy_(test["xy_L2"])  # the new users' city: same ids, other places
    after = _top1_hits(head, test, h_test)
    assert after >= 0.95 > before + 0.3, (before, after)
    recency_top1 = (test["ptr_loc"][:, -2] == test["target_loc"]).float().mean().item()
    assert recency_top1 == 0.0  # the most recent other place is never the answer
