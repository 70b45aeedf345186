"""Generic check-in CSV reader (`prepare --dataset csv`): configurable column names, full timestamps
(ISO-8601 or unix seconds) or weekday + hour (+ trajectory order) columns."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nextlocmoe.data.parsing import (
    DataError,
    local_weekday_hour,
    parse_float,
    parse_int,
    parse_time_minutes,
    parse_weekday,
    read_csv_columns,
    sha256_file,
)
from nextlocmoe.data.sources import RecordTable, _apply_reasons, note_drops, valid_latlon

WEEK_MIN = 7 * 1440


@dataclass
class CsvSpec:
    """Column names of a generic check-in CSV. Either `time_col` or both `weekday_col` and `hour_col`."""

    user_col: str = "user"
    venue_col: str = "venue"
    time_col: str | None = None
    lat_col: str | None = None
    lon_col: str | None = None
    category_col: str | None = None
    weekday_col: str | None = None
    hour_col: str | None = None
    order_col: str | None = None
    duration_col: str | None = None
    timezone: str | None = None

    def columns(self) -> list[str]:
        """Every configured column (all must exist in the header)."""
        names = [self.user_col, self.venue_col, self.time_col, self.lat_col, self.lon_col, self.category_col]
        names += [self.weekday_col, self.hour_col, self.order_col, self.duration_col]
        return [n for n in names if n]

    def check(self) -> None:
        if not self.time_col and not (self.weekday_col and self.hour_col):
            raise DataError("csv: give --time-col, or --weekday-col and --hour-col (optionally --order-col)")
        if bool(self.lat_col) != bool(self.lon_col):
            raise DataError("csv: give both --lat-col and --lon-col, or neither")


def _csv_path(source: Path) -> Path:
    source = Path(source)
    if source.is_dir():
        files = sorted(source.glob("*.csv"))
        if len(files) != 1:
            raise DataError(f"{source}: expected exactly one .csv file in the directory, found {len(files)}")
        return files[0]
    if not source.is_file():
        raise DataError(f"{source}: file not found")
    return source


def read_csv_source(source: Path, spec: CsvSpec) -> RecordTable:
    """Read a generic check-in CSV into a RecordTable (split by time later)."""
    spec.check()
    path = _csv_path(source)
    c = read_csv_columns(path, spec.columns())
    raw, dropped = c.cols, Counter({"malformed_row": c.n_malformed})
    examples: dict[str, list[str]] = {}
    note_drops(examples, "malformed_row", f"{path.name}:", c.malformed_lines)
    user, venue = raw[spec.user_col], raw[spec.venue_col]
    reasons = [("missing_field", (np.char.str_len(user) == 0) | (np.char.str_len(venue) == 0))]
    if spec.time_col:
        minutes, ok_t = parse_time_minutes(raw[spec.time_col])
    else:
        wd, ok_w = parse_weekday(raw[spec.weekday_col])
        hr, ok_h = parse_int(raw[spec.hour_col])
        ok_t = ok_w & ok_h & (hr >= 0) & (hr < 24)
    reasons.append(("unparsable_time", ~ok_t))
    lat = lon = np.full(len(user), np.nan)
    if spec.lat_col:
        lat, _ = parse_float(raw[spec.lat_col])
        lon, _ = parse_float(raw[spec.lon_col])
        reasons.append(("bad_coordinate", ~valid_latlon(lat, lon)))
    dur = None
    if spec.duration_col:
        dur, ok_d = parse_float(raw[spec.duration_col])
        reasons.append(("bad_duration", ~(ok_d & (dur >= 0))))
    keep = _apply_reasons(reasons, dropped, len(user), examples, (f"{path.name}:", c.lines))
    if not keep.any():
        raise DataError(f"{path}: no usable rows (dropped: {dict(dropped)})")
    if spec.time_col:
        t, weekday, hour, origin = _from_timestamps(minutes[keep], spec.timezone)
    else:
        order = raw[spec.order_col][keep] if spec.order_col else None
        t, origin = _from_weekday_hour(user[keep], wd[keep], hr[keep], order)
        weekday, hour = wd[keep].astype(np.int8), hr[keep].astype(np.int8)
    return RecordTable(
        dataset="csv",
        user=_maybe_int(user[keep]),
        venue=_maybe_int(venue[keep]),
        t_min=t,
        lat=lat[keep],
        lon=lon[keep],
        weekday=weekday,
        hour=hour,
        input_rows=c.n_rows,
        dropped=dropped,
        drop_examples=examples,
        source_sha256={path.name: sha256_file(path)},
        time_origin=origin,
        dur_min=None if dur is None else dur[keep],
        category=raw[spec.category_col][keep] if spec.category_col else None,
        coordinate_units="degrees" if spec.lat_col else "none",
    )


def _maybe_int(ids: np.ndarray) -> np.ndarray:
    """[R] str ids -> int64 when every one is an integer (numeric order of dense ids), else unchanged."""
    num, ok = parse_int(ids)
    return num if len(ids) and ok.all() else ids


def _from_timestamps(minutes: np.ndarray, tz: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Minutes since 1970 [R] -> (t_min since the first day's midnight, weekday, hour, origin text)."""
    weekday, hour = local_weekday_hour(np.floor(minutes).astype(np.int64), tz)
    origin_min = np.floor(minutes.min() / 1440.0) * 1440.0
    t = np.floor(minutes - origin_min).astype(np.int64)
    day = np.datetime64(int(origin_min), "m").astype("datetime64[D]")
    clock = "UTC (unix seconds, offset-aware ISO converted; naive ISO taken as written)"
    where = f"weekday/hour in {tz} (DST-aware)" if tz else "weekday/hour from that same clock"
    return t, weekday, hour, f"t_min = minutes since {day}T00:00 {clock}; {where}"


def _from_weekday_hour(
    user: np.ndarray, weekday: np.ndarray, hour: np.ndarray, order: np.ndarray | None
) -> tuple[np.ndarray, str]:
    """Monotonic per-user time [R] int64 from weekday/hour (+ trajectory order) and file order."""
    n = len(user)
    _, ucode = np.unique(user, return_inverse=True)
    ocode = np.zeros(n, dtype=np.int64)
    if order is not None:
        num, ok = parse_int(order)
        ocode = num if ok.all() else np.unique(order, return_inverse=True)[1].reshape(-1)
    idx = np.lexsort((np.arange(n), ocode, ucode.reshape(-1)))
    u, o = ucode.reshape(-1)[idx], ocode[idx]
    key = weekday[idx].astype(np.int64) * 24 + hour[idx]
    new_user = np.r_[True, u[1:] != u[:-1]]
    inc = np.r_[False, (o[1:] != o[:-1]) | (key[1:] < key[:-1])]
    inc[new_user] = False
    week = np.cumsum(inc)
    week -= np.maximum.accumulate(np.where(new_user, week, 0))
    t = np.empty(n, dtype=np.int64)
    t[idx] = week * WEEK_MIN + key * 60
    text = (
        "reconstructed per user (no dates in the data): each user's first record is in week 0, which starts "
        "on a Monday 00:00; t_min = week * 10080 + weekday * 1440 + hour * 60. Records are ordered by "
        "(order column, file order); a new order-column value (trajectory) starts a new week, and a "
        "weekday/hour going backwards within one starts a new week. Assumes consecutive trajectories are "
        "consecutive weeks; records in the same hour share t_min (file order kept). Times of different "
        "users are not comparable."
    )
    return t, text if order is not None else text.replace("(order column, file order)", "file order")
