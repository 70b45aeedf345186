"""Serving pieces without an engine: the run's data folder, the featurizer on raw records, user histories,
raw-record validation and the micro-batcher (docs/SERVING.md)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from nextlocmoe.data.featurize import sample_features, sequence_columns
from nextlocmoe.data.store import TrajectoryDataset, load_stats
from nextlocmoe.model.io import RunError, resolve_data_dir
from nextlocmoe.serve.engine import Engine
from nextlocmoe.serve.history import RequestError, UserHistory, VenueIndex, parse_time, record_xy, sequence
from nextlocmoe.serve.server import MicroBatcher


def _store(root: Path) -> Path:
    d = root / "demo-out" / "data"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text("{}")
    (root / "demo-out" / "run").mkdir()
    return d


def test_run_data_dir_found_from_any_working_directory_and_after_a_move(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a demo-out/ in the real working directory would be found first
    data = _store(tmp_path / "a")
    assert resolve_data_dir(tmp_path / "a" / "demo-out" / "run", "demo-out/data") == data  # via a parent
    (tmp_path / "a").rename(tmp_path / "moved")
    got = resolve_data_dir(tmp_path / "moved" / "demo-out" / "run", "demo-out/data")
    assert got == tmp_path / "moved" / "demo-out" / "data"  # the run's sibling of the same name
    gone = tmp_path / "a" / "demo-out" / "data"  # an absolute data.dir that moved with its run
    assert resolve_data_dir(tmp_path / "moved" / "demo-out" / "run", str(gone)) == got
    with pytest.raises(RunError, match="not found .* pass the prepared data folder with --data"):
        resolve_data_dir(tmp_path / "moved" / "demo-out" / "run", "nowhere/else")


def test_featurizer_on_raw_records_gives_the_store_tensors(prepared_fsq: Path, fsq_dir: Path) -> None:
    """Rebuild every test sample of the tiny store from NYC.npy rows with the serving path."""
    ds = TrajectoryDataset(prepared_fsq, "test", pointer=16)
    raw, users = np.load(fsq_dir / "NYC.npy"), np.load(prepared_fsq / "users.npy")
    loc_ids = np.load(prepared_fsq / "locations.npz")["id"]
    xy = np.load(prepared_fsq / "locations.npz")
    rec = {k: np.load(prepared_fsq / "records" / f"{k}.npy") for k in ("user", "t_min", "weekday", "hour")}
    seqs = []
    for r in ds.samples:
        u = users[rec["user"][r]]
        rows = raw[(raw[:, 0] == u) & (raw[:, 2] < rec["t_min"][r])]
        rows = rows[np.argsort(rows[:, 2], kind="stable")]
        loc = np.searchsorted(loc_ids, rows[:, 1])
        h = UserHistory(1 << 30)
        for li, t in zip(loc, rows[:, 2], strict=True):
            h.add(int(li), float(xy["x"][li]), float(xy["y"][li]), int(t))
        s = sequence(h, len(h), int(rec["t_min"][r]), 1 << 30)  # the whole prefix + the query
        idx = np.flatnonzero(rec["user"] == rec["user"][r])  # store weekday/hour (the fsq-nyc clock)
        s["weekday"] = rec["weekday"][idx[: len(s["t_min"])]]
        s["hour"] = rec["hour"][idx[: len(s["t_min"])]]
        seqs.append(s)
    cols, r_new = sequence_columns(seqs, 1440.0)
    got = sample_features(cols, load_stats(prepared_fsq), r_new, ds.history, ds.current, 16)
    want = ds.get_batch(np.arange(len(ds)))
    for k in got:
        if not k.startswith("target_"):  # of the target only its time is an input (query_*)
            assert np.array_equal(got[k], want[k]), k


def test_user_history_order_duplicates_and_window() -> None:
    h = UserHistory(keep=3)
    assert h.add(1, 0.0, 0.0, 10) and not h.add(1, 0.0, 0.0, 10)  # a repeat of (venue, minute) is dropped
    with pytest.raises(RequestError, match="time order"):
        h.add(2, 0.0, 0.0, 5)
    assert h.add(2, 0.0, 0.0, 5, allow_past=True) and h.t_min == [5, 10]
    for t in (11, 12, 13):
        h.add(3, 0.0, 0.0, t)
    assert h.t_min == [11, 12, 13] and h.before(13) == 2


def _engine() -> Engine:
    v = {"id": np.array([7, 9]), "x": np.array([1.0, 2.0]), "y": np.array([3.0, 4.0])}
    return Engine(Path("."), {}, {}, v)


def test_raw_record_validation() -> None:
    e = _engine()
    idx = VenueIndex(e.venues["id"])
    assert record_xy(e, idx, "9", None, None) == (1, 2.0, 4.0)  # known: the engine's coordinates
    loc, x, y = record_xy(e, idx, "new-place", 40.7, -74.0)  # unknown: its own coordinates, index -1
    assert loc == -1 and math.isclose(x, -8237642.3, rel_tol=1e-6)
    for lat, lon in ((math.nan, 1.0), (95.0, 1.0), (0.0, 0.0), ("x", 1.0)):
        with pytest.raises(RequestError, match="new-place"):
            record_xy(e, idx, "new-place", lat, lon)
    with pytest.raises(RequestError, match="no lat/lon"):
        record_xy(e, idx, "new-place", None, None)
    assert parse_time(120) == 2 and parse_time("1970-01-01T01:00:00Z") == 60
    for bad in ("yesterday", math.inf, None, True):
        with pytest.raises(RequestError):
            parse_time(bad)


def test_micro_batcher_groups_concurrent_requests() -> None:
    async def main() -> tuple[list, dict]:
        b = MicroBatcher(lambda items: [i * 10 for i in items], max_batch=4, max_wait_ms=50)
        task = asyncio.create_task(b.run())
        out = await asyncio.gather(*(b.submit(i) for i in range(10)))
        task.cancel()
        return out, dict(b.sizes)

    out, sizes = asyncio.run(main())
    assert out == [i * 10 for i in range(10)] and sizes == {4: 2, 2: 1}
