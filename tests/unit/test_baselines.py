"""Baselines on hand-made sequences with known answers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from nextlocmoe.data.layout import write_store
from nextlocmoe.data.sources import RecordTable
from nextlocmoe.data.windows import build
from nextlocmoe.eval.baselines import BaselineModel, baseline_report, evaluate_baselines


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """User A alternates venues 10, 20 (10 records); user B stays at 30 (10 records). C = H = 2.
    Time split per user: positions 0-6 train, 7 valid, 8-9 test."""
    venue = np.array([10, 20] * 5 + [30] * 10)
    user = np.array([1] * 10 + [2] * 10)
    n = len(venue)
    t = RecordTable(
        dataset="toy",
        user=user,
        venue=venue,
        t_min=np.tile(np.arange(10) * 60, 2),
        lat=40.0 + venue / 1000,
        lon=np.full(n, -74.0),
        weekday=np.zeros(n, np.int8),
        hour=np.zeros(n, np.int8),
        input_rows=n,
        dropped=Counter(),
        source_sha256={},
        time_origin="toy",
    )
    prep = build(t, history=2, current=2, min_history=1, duration_cap_min=1440)
    manifest = {
        "dataset": "toy",
        "locations": 3,
        "history": 2,
        "current": 2,
        "has_coordinates": True,
        "coordinate_units": "degrees",
    }
    write_store(prep, tmp_path / "s", manifest)
    return tmp_path / "s"


def test_known_ranks(store: Path) -> None:
    res, ref = evaluate_baselines(store, "test", progress=False)
    # test targets: A pos 8 (venue 10 = id 0), A pos 9 (venue 20 = id 1), B pos 8, 9 (venue 30 = id 2)
    assert ref["target"].tolist() == [0, 1, 2, 2]
    assert res["markov"]["ranks"].tolist() == [1, 1, 1, 1]  # 20->10 and 10->20, 30->30
    # user counts (earlier train records + own window): pos 8: {10: 4, 20: 3 + 1 valid} tie -> popularity;
    # pos 9: {10: 4 + 1 test input, 20: 4} -> 10 first, target 20 second
    assert res["user_frequency"]["ranks"].tolist() == [1, 2, 1, 1]
    # train popularity: 30 x7, 10 x4, 20 x3
    assert res["global_popularity"]["ranks"].tolist() == [2, 3, 1, 1]
    assert res["global_popularity"]["top1"].tolist() == [2, 2, 2, 2]


def test_report_metrics_and_distance(store: Path) -> None:
    rep = baseline_report(store, "test", progress=False)
    assert rep["n"] == 4 and rep["split"] == "test"
    g = rep["baselines"]["global_popularity"]
    assert g["hit@1"] == 0.5 and g["mrr"] == pytest.approx((0.5 + 1 / 3 + 2) / 4)
    assert rep["baselines"]["markov"]["mean_distance_m"] == 0.0
    assert g["mean_distance_m"] == pytest.approx((20 + 10) / 1000 * 111_195 / 4, rel=1e-3)


def test_user_counts_never_include_target_or_future(store: Path) -> None:
    rec = {n: np.load(store / "records" / f"{n}.npy") for n in ("loc", "user", "split", "pos")}
    model = BaselineModel(rec, 3, window=4)
    counts = model.user_counts(np.array([5, 15]))  # train targets: A pos 5 (venue 20), B pos 5
    assert counts.tolist() == [[3, 2, 0], [0, 0, 5]]  # only positions 0-4 are counted
