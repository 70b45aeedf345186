"""Prepare each shipped data set into tmp: manifest accounting, timing (< 60 s), loadable batches."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nextlocmoe.data import TrajectoryDataset, collate
from nextlocmoe.data.csvsource import CsvSpec
from nextlocmoe.data.prepare import prepare

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CATEGORIES = CsvSpec(
    user_col="label",
    venue_col="poi",
    lat_col="lat",
    lon_col="lon",
    category_col="category",
    weekday_col="day",
    hour_col="hour",
    order_col="tid",
)
CASES = [
    ("fsq-nyc", "fsq-nyc", 147_938, None),
    ("llmmob-fsq-nyc", "llmmob-fsq-nyc", 59_701 + 17_073 + 18_598, None),
    ("llmmob-geolife", "llmmob-geolife", 16_622, None),
    ("csv", "fsq-nyc-categories/foursquare_nyc.csv", 44_809, CATEGORIES),
]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}"),
]


@pytest.mark.parametrize("dataset, rel, rows, spec", CASES, ids=[c[0] for c in CASES])
def test_prepare_real(tmp_path: Path, dataset: str, rel: str, rows: int, spec: CsvSpec | None) -> None:
    t0 = time.perf_counter()
    m = prepare(dataset, DATA / rel, tmp_path / dataset, csv_spec=spec)
    assert time.perf_counter() - t0 < 60
    assert m["input_rows"] == rows
    assert m["kept_rows"] + sum(m["dropped"].values()) == rows
    assert m["records"] == m["kept_rows"] and all(m["samples"][s] > 0 for s in ("train", "valid", "test"))
    assert m["has_coordinates"] == (dataset != "llmmob-geolife")
    if dataset == "llmmob-fsq-nyc":
        rec = m["coordinate_recovery"]
        assert rec["accepted"] and rec["median_residual_m"] < 30 and m["coordinate_units"] == "degrees"
    ds = TrajectoryDataset(tmp_path / dataset, "test")
    batch = collate([ds[i] for i in range(0, len(ds), max(1, len(ds) // 16))])
    assert batch["hist_xy"].shape[1:] == (40, 2) and batch["cur_loc"].shape[1] == 5
