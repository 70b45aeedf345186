"""Readers: happy paths, accounting, and corrupted inputs (bad coordinate, garbled time, truncated last line,
missing column, wrong .npy shape/dtype)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nextlocmoe.data.csvsource import CsvSpec, read_csv_source
from nextlocmoe.data.parsing import DataError
from nextlocmoe.data.sources import read_fsq_nyc, read_llmmob


def _total(t) -> int:
    return len(t) + sum(t.dropped.values())


def test_fsq_nyc_reads_all_rows(fsq_dir: Path) -> None:
    t = read_fsq_nyc(fsq_dir)
    assert len(t) == 60 and t.input_rows == 60 and _total(t) == 60
    assert np.isfinite(t.lat).all() and set(t.source_sha256) == {"NYC.npy", "NYC_POI.npy"}
    assert t.weekday.min() >= 0 and t.weekday.max() <= 6 and t.hour.max() <= 23
    # t=0 is 2012-04-03 18:00 UTC = 14:00 EDT, a Tuesday
    assert "assum" in t.time_origin


def test_fsq_nyc_weekday_hour_origin(tmp_path: Path) -> None:
    root = tmp_path / "o"
    root.mkdir()
    np.save(root / "NYC.npy", np.array([[1, 1, 0], [1, 1, 600], [1, 1, 215 * 1440]], dtype=np.int32))
    np.save(root / "NYC_POI.npy", np.array([[1, 40.7, -74.0]]))
    t = read_fsq_nyc(root)
    assert t.weekday.tolist()[:2] == [1, 2]  # Tue 14:00, then +10 h = Wed 00:00
    assert t.hour.tolist()[:2] == [14, 0]
    assert t.hour[2] == 13  # 2012-11-04 is after the DST change: EST, one hour earlier on the clock


def test_fsq_nyc_unknown_venue_and_bad_coordinate(fsq_dir: Path) -> None:
    arr = np.load(fsq_dir / "NYC.npy")
    arr[0, 1] = 999  # unknown venue
    np.save(fsq_dir / "NYC.npy", arr)
    poi = np.load(fsq_dir / "NYC_POI.npy")
    poi[1, 1] = np.nan  # venue 2: bad coordinate
    np.save(fsq_dir / "NYC_POI.npy", poi)
    t = read_fsq_nyc(fsq_dir)
    assert t.dropped["unknown_venue"] == 1
    assert t.dropped["bad_coordinate"] == int((arr[1:, 1] == 2).sum())
    assert _total(t) == 60


@pytest.mark.parametrize(
    "bad, match",
    [(np.zeros((5, 2), dtype=np.int32), "shape"), (np.zeros((5, 3), dtype=np.float32), "dtype")],
)
def test_fsq_nyc_npy_shape_dtype_errors(fsq_dir: Path, bad: np.ndarray, match: str) -> None:
    np.save(fsq_dir / "NYC.npy", bad)
    with pytest.raises(DataError, match=match) as e:
        read_fsq_nyc(fsq_dir)
    assert "NYC.npy" in str(e.value)


def test_fsq_nyc_truncated_npy(fsq_dir: Path) -> None:
    data = (fsq_dir / "NYC.npy").read_bytes()
    (fsq_dir / "NYC.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="NYC.npy"):
        read_fsq_nyc(fsq_dir)


def test_llmmob_nyc_split_and_accounting(llmmob_nyc_dir: Path) -> None:
    t = read_llmmob(llmmob_nyc_dir, "llmmob-fsq-nyc")
    assert t.input_rows == 40 and len(t) == 40
    assert np.bincount(t.split).tolist() == [24, 8, 8]
    assert t.coordinate_units == "normalised"


def _corrupt(path: Path, line_no: int, new: str | None) -> None:
    lines = path.read_text().splitlines()
    if new is None:
        lines = lines[:line_no]
    else:
        lines[line_no - 1] = new
    path.write_text("\n".join(lines) + ("\n" if new is not None else ""))


def test_llmmob_bad_coordinate_and_garbled_time(llmmob_nyc_dir: Path) -> None:
    f = llmmob_nyc_dir / "foursquare_train.csv"
    lines = f.read_text().splitlines()
    p2, p3 = lines[2].split(","), lines[3].split(",")
    p2[3] = "4O.x"  # garbled latitude
    p3[5] = "day7"  # garbled start_day
    _corrupt(f, 3, ",".join(p2))
    _corrupt(f, 4, ",".join(p3))
    t = read_llmmob(llmmob_nyc_dir, "llmmob-fsq-nyc")
    assert t.dropped["bad_coordinate"] == 1 and t.dropped["unparsable_time"] == 1
    assert _total(t) == 40
    # the manifest names the dropped rows by file and line
    assert t.drop_examples["bad_coordinate"] == ["foursquare_train.csv:3"]
    assert t.drop_examples["unparsable_time"] == ["foursquare_train.csv:4"]


def test_llmmob_truncated_last_line(llmmob_nyc_dir: Path) -> None:
    f = llmmob_nyc_dir / "foursquare_test.csv"
    text = f.read_text().rstrip("\n")
    f.write_text(text[: text.rfind(",") - 3])  # cut in the middle of the last row, no newline
    t = read_llmmob(llmmob_nyc_dir, "llmmob-fsq-nyc")
    assert t.dropped["malformed_row"] == 1 and _total(t) == 40
    n_lines = len(text.splitlines())
    assert t.drop_examples["malformed_row"] == [f"foursquare_test.csv:{n_lines}"]


def test_llmmob_missing_column_names_file_and_field(llmmob_nyc_dir: Path) -> None:
    f = llmmob_nyc_dir / "foursquare_valid.csv"
    _corrupt(f, 1, "id,user_id,location_id,latitude,longitude,start_day,start_minute,weekday")
    with pytest.raises(DataError) as e:
        read_llmmob(llmmob_nyc_dir, "llmmob-fsq-nyc")
    msg = str(e.value)
    assert "foursquare_valid.csv" in msg and "line 1" in msg and "start_min" in msg


def test_geolife_durations(geolife_dir: Path) -> None:
    f = geolife_dir / "geolife_train.csv"
    parts = f.read_text().splitlines()[5].split(",")
    parts[3] = "-3"
    _corrupt(f, 6, ",".join(parts))
    t = read_llmmob(geolife_dir, "llmmob-geolife")
    assert t.dropped["bad_duration"] == 1 and len(t) == 39
    assert t.dur_min is not None and np.all(t.dur_min > 0)
    assert np.isnan(t.lat).all() and t.coordinate_units == "none"


def test_missing_source_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing source"):
        read_llmmob(tmp_path, "llmmob-geolife")


SPEC = CsvSpec(
    user_col="user", venue_col="venue", time_col="time", lat_col="lat", lon_col="lon", category_col="category"
)


def test_csv_iso_and_unix(checkin_csv: Path, tmp_path: Path) -> None:
    t = read_csv_source(checkin_csv, SPEC)
    assert len(t) == 45 and t.t_min.min() == 15 and t.category is not None
    assert t.user.dtype.kind == "U" and t.venue.dtype.kind == "i"  # numeric venue ids become int64
    unix = tmp_path / "unix.csv"
    unix.write_text("user,venue,time,lat,lon\na,1,1333411200,40.7,-74\na,2,1333414800,40.8,-74\n")
    t2 = read_csv_source(unix, CsvSpec(time_col="time", lat_col="lat", lon_col="lon"))
    assert t2.t_min.tolist() == [0, 60] and t2.weekday.tolist() == [1, 1]  # 2012-04-03 UTC, a Tuesday


def test_csv_corruptions(checkin_csv: Path) -> None:
    lines = checkin_csv.read_text().splitlines()
    a = lines[1].split(",")
    a[3] = "forty"  # garbled latitude
    b = lines[2].split(",")
    b[2] = "2012-13-45T99:00"  # garbled time
    c = lines[3].split(",")
    c[0] = ""  # missing user
    lines[1:4] = [",".join(a), ",".join(b), ",".join(c)]
    lines[-1] = lines[-1][:12]  # truncated last line
    checkin_csv.write_text("\n".join(lines))
    t = read_csv_source(checkin_csv, SPEC)
    assert t.dropped == {"malformed_row": 1, "missing_field": 1, "unparsable_time": 1, "bad_coordinate": 1}
    assert len(t) + sum(t.dropped.values()) == 45


def test_csv_missing_column(checkin_csv: Path) -> None:
    with pytest.raises(DataError, match=r"checkins.csv: line 1: .*'when'"):
        read_csv_source(checkin_csv, CsvSpec(time_col="when", lat_col="lat", lon_col="lon"))


def test_csv_weekday_hour_order(tmp_path: Path) -> None:
    f = tmp_path / "cat.csv"
    rows = ["tid,label,day,hour,poi,lat,lon,category"]
    rows += [f"7,u1,{d},{h},{p},40.7,-74.0,Food" for d, h, p in [("Monday", 9, 1), ("Friday", 20, 2)]]
    rows += [f"8,u1,{d},{h},{p},40.7,-74.0,Food" for d, h, p in [("Tuesday", 8, 3), ("Monday", 7, 1)]]
    rows += ["3,u2,Sunday,23,4,40.7,-74.0,Shop"]
    f.write_text("\n".join(rows) + "\n")
    spec = CsvSpec(
        user_col="label",
        venue_col="poi",
        weekday_col="day",
        hour_col="hour",
        order_col="tid",
        lat_col="lat",
        lon_col="lon",
        category_col="category",
    )
    t = read_csv_source(f, spec)
    week = 7 * 1440
    assert t.t_min.tolist() == [
        9 * 60,
        4 * 1440 + 20 * 60,
        week + 1440 + 8 * 60,
        2 * week + 7 * 60,
        6 * 1440 + 23 * 60,
    ]
    assert "Monday 00:00" in t.time_origin
    assert t.weekday.tolist() == [0, 4, 1, 0, 6]


def test_csv_spec_needs_time(checkin_csv: Path) -> None:
    with pytest.raises(DataError, match="time-col"):
        read_csv_source(checkin_csv, CsvSpec())
