"""windows.build: sorting, de-duplication, short users, durations, time split, sample eligibility."""

from __future__ import annotations

from collections import Counter

import numpy as np

from nextlocmoe.data.sources import RecordTable
from nextlocmoe.data.windows import build


def table(user, venue, t, dur=None, split=None, lat=None) -> RecordTable:
    n = len(t)
    venue = np.asarray(venue, dtype=np.int64)
    return RecordTable(
        dataset="test",
        user=np.asarray(user, dtype=np.int64),
        venue=venue,
        t_min=np.asarray(t, dtype=np.int64),
        lat=np.asarray(lat if lat is not None else 40.0 + 0.01 * venue, dtype=float),
        lon=-74.0 + 0.01 * venue,
        weekday=np.zeros(n, np.int8),
        hour=np.zeros(n, np.int8),
        input_rows=n,
        dropped=Counter(),
        source_sha256={},
        time_origin="test",
        dur_min=None if dur is None else np.asarray(dur, dtype=float),
        split=None if split is None else np.asarray(split, dtype=np.int8),
    )


def test_sort_dedup_short_users() -> None:
    # user 1: 10 records out of order + 1 duplicate; user 2: 3 records (too short for C=2, min_history=1)
    t1 = [50, 10, 30, 20, 40, 90, 60, 70, 80, 100, 30]
    v1 = [5, 1, 3, 2, 4, 9, 6, 7, 8, 1, 3]
    p = build(
        table([1] * 11 + [2] * 3, v1 + [1, 2, 3], t1 + [5, 6, 7]),
        history=4,
        current=2,
        min_history=1,
        duration_cap_min=1440,
    )
    assert p.dropped == {"duplicate": 1, "user_too_short": 3}
    assert p.records["t_min"].tolist() == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert p.records["pos"].tolist() == list(range(10))
    assert p.locations["id"].tolist() == list(range(1, 10))
    assert p.records["loc"][0] == 0 and p.records["loc"][-1] == 0  # venue 1 -> dense id 0
    assert len(p.user_ids) == 1


def test_durations_gap_cap_and_last() -> None:
    p = build(table([1] * 5, [1, 2, 3, 4, 5], [0, 10, 30, 3000, 3010]), 2, 2, 1, duration_cap_min=100)
    # gaps 10, 20, 2970 -> capped 100, 10; last record = user's median of the others (15)
    assert p.records["dur_min"].tolist() == [10, 20, 100, 10, 15]


def test_given_durations_capped() -> None:
    p = build(table([1] * 4, [1, 2, 3, 4], [0, 1, 2, 3], dur=[5, 5000, np.nan, 7]), 1, 1, 1, 1440)
    assert p.records["dur_min"].tolist() == [5, 1440, 1, 7]  # NaN falls back to the gap


def test_time_split_and_samples() -> None:
    n = 20
    p = build(
        table([1] * n, np.arange(n) % 4 + 1, np.arange(n) * 10),
        history=5,
        current=3,
        min_history=1,
        duration_cap_min=1440,
    )
    split = p.records["split"]
    assert np.bincount(split).tolist() == [14, 2, 4]  # 70 / 10 / 20 %
    assert np.all(np.diff(split) >= 0)  # train before valid before test, per user
    assert p.samples["train"].tolist() == list(range(4, 14))  # pos >= C + min_history
    assert p.samples["valid"].tolist() == [14, 15] and p.samples["test"].tolist() == [16, 17, 18, 19]
    assert p.info["targets_without_full_window"]["train"] == 4


def test_own_split_kept() -> None:
    p = build(table([1] * 6, [1, 2, 3, 1, 2, 3], np.arange(6), split=[0, 0, 0, 0, 1, 2]), 2, 2, 1, 1440)
    assert p.records["split"].tolist() == [0, 0, 0, 0, 1, 2]
    assert p.samples["valid"].tolist() == [4] and p.samples["test"].tolist() == [5]
    assert "own split" in p.info["split_method"]


def test_location_coordinate_mode_and_category() -> None:
    t = table([1] * 5, [1, 1, 1, 2, 2], np.arange(5), lat=[40.0, 40.5, 40.5, 41.0, 41.0])
    t.category = np.array(["a", "b", "b", "", "c"])
    p = build(t, 2, 2, 1, 1440)
    assert p.locations["lat"].tolist() == [40.5, 41.0]
    assert p.locations["category"].tolist() == ["b", "c"]
    assert p.info["location_coordinate_spread_m"]["rows_off_by_more_than_10m"] == 1
    assert p.records["x"][0] == p.locations["x"][0]  # records carry their location's coordinate
