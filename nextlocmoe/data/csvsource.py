"""Generic check-in CSV reader (`prepare --dataset csv`): configurable column names, full timestamps
(ISO-8601 or unix time in s/ms/us/ns, detected) or weekday + hour (+ trajectory order) columns; plain,
gzip/zstd/bzip2 CSV or Parquet (data/sanity.py: formats, units, coordinates, the hash of the bytes read)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nextlocmoe.data.parsing import (
    DataError,
    ids_as_int_if_all,
    local_weekday_hour,
    parse_float,
    parse_id,
    parse_int,
    parse_weekday,
    read_csv_columns,
)
from nextlocmoe.data.sanity import check_coordinates, time_unit, time_values, unit_minutes
from nextlocmoe.data.sources import RecordTable, _apply_reasons, first_drop_line, note_malformed, valid_latlon

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
    force_coordinates: bool = False  # keep coordinates that look swapped or projected (data/sanity.py)

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
        kinds = ("*.csv", "*.csv.gz", "*.csv.zst", "*.csv.bz2", "*.parquet", "*.pq")
        files = sorted(f for k in kinds for f in source.glob(k))
        if len(files) != 1:
            raise DataError(
                f"{source}: expected exactly one data file ({', '.join(kinds)}), found {len(files)}"
            )
        return files[0]
    if not source.is_file():
        raise DataError(f"{source}: file not found")
    return source


def _parse_rows(spec: CsvSpec, raw: dict[str, np.ndarray], path: Path) -> tuple[dict[str, np.ndarray], list]:
    """Parsed columns (user, venue, time parts or wd/hr, lat, lon, dur) and the drop reasons with the
    fields and raw values each checks (for the 'file:line: field=value' examples). Row-local: the file's
    time unit and coordinate check are decided over all rows by the caller (`check_file_wide`)."""
    v: dict[str, np.ndarray] = {}
    v["user"], ok_u = parse_id(raw[spec.user_col])
    v["venue"], ok_v = parse_id(raw[spec.venue_col])
    ids = [(spec.user_col, ~ok_u, raw[spec.user_col]), (spec.venue_col, ~ok_v, raw[spec.venue_col])]
    reasons = [("missing_field", ~(ok_u & ok_v), ids)]
    if spec.time_col:  # unit-free parts: the unit is decided over the whole file (sanity.time_unit)
        v["tnum"], v["tnum_ok"], v["tiso"], v["units_seen"] = time_values(raw[spec.time_col])
        ok_t = v["tnum_ok"] | np.isfinite(v["tiso"])
        t_detail = [(spec.time_col, ~ok_t, raw[spec.time_col])]
    else:
        v["wd"], ok_w = parse_weekday(raw[spec.weekday_col])
        v["hr"], ok_h = parse_int(raw[spec.hour_col])
        ok_h &= (v["hr"] >= 0) & (v["hr"] < 24)
        ok_t = ok_w & ok_h
        t_detail = [(spec.weekday_col, ~ok_w, raw[spec.weekday_col])]
        t_detail.append((spec.hour_col, ~ok_h, raw[spec.hour_col]))
    reasons.append(("unparsable_time", ~ok_t, t_detail))
    v["lat"] = v["lon"] = np.full(len(v["user"]), np.nan)
    if spec.lat_col:
        v["lat"], _ = parse_float(raw[spec.lat_col])
        v["lon"], _ = parse_float(raw[spec.lon_col])
        bad = ~valid_latlon(v["lat"], v["lon"])
        detail = [(spec.lat_col, bad, raw[spec.lat_col]), (spec.lon_col, bad, raw[spec.lon_col])]
        reasons.append(("bad_coordinate", bad, detail))
    if spec.duration_col:
        v["dur"], ok_d = parse_float(raw[spec.duration_col])
        ok_d &= v["dur"] >= 0
        reasons.append(("bad_duration", ~ok_d, [(spec.duration_col, ~ok_d, raw[spec.duration_col])]))
    return v, reasons


def check_file_wide(spec: CsvSpec, path: Path, units_seen: dict, lat: np.ndarray, lon: np.ndarray) -> str:
    """The file-wide checks of a CSV source, in memory: its one time unit (returned; refuses a mix), then
    its coordinates (refuses swapped or projected ones unless --force-coordinates)."""
    unit = time_unit(units_seen, f"{path}: column {spec.time_col}") if spec.time_col else ""
    if spec.lat_col:
        where = f"{path}: columns {spec.lat_col}/{spec.lon_col}"
        check_coordinates(lat, lon, where, spec.force_coordinates)
    return unit


def read_csv_source(source: Path, spec: CsvSpec) -> RecordTable:
    """Read a generic check-in CSV into a RecordTable (split by time later). Ids may be any text."""
    spec.check()
    path = _csv_path(source)
    c = read_csv_columns(path, spec.columns())
    raw, dropped = c.cols, Counter()
    examples: dict[str, list[str]] = {}
    first: dict[str, str] = {}
    note_malformed(c, dropped, examples, first)
    v, reasons = _parse_rows(spec, raw, path)
    unit = check_file_wide(spec, path, v.get("units_seen", {}), v["lat"], v["lon"])
    if spec.time_col:
        v["minutes"] = unit_minutes(v["tnum"], v["tnum_ok"], v["tiso"], unit)
    keep = _apply_reasons(reasons, dropped, len(v["user"]), examples, (f"{path.name}:", c.lines), first)
    if not keep.any():
        raise DataError(f"{path}: no usable rows of {c.n_rows}: {first_drop_line(dropped, first)}")
    user = v["user"][keep]
    if spec.time_col:
        t, weekday, hour, origin = _from_timestamps(v["minutes"][keep], spec.timezone)
        origin = f"time column {spec.time_col!r} read as {unit}; {origin}"
    else:
        order = raw[spec.order_col][keep] if spec.order_col else None
        wd, hr = v["wd"][keep], v["hr"][keep]
        t, origin = _from_weekday_hour(user, wd, hr, order)
        weekday, hour = wd.astype(np.int8), hr.astype(np.int8)
    return RecordTable(
        dataset="csv",
        user=ids_as_int_if_all(user),
        venue=ids_as_int_if_all(v["venue"][keep]),
        t_min=t,
        lat=v["lat"][keep],
        lon=v["lon"][keep],
        weekday=weekday,
        hour=hour,
        input_rows=c.n_rows,
        dropped=dropped,
        drop_examples=examples,
        drop_first=first,
        source_sha256={path.name: c.sha256},  # of the bytes read (compressed: of the decompressed bytes)
        time_origin=origin,
        dur_min=v["dur"][keep] if "dur" in v else None,
        category=raw[spec.category_col][keep] if spec.category_col else None,
        coordinate_units="degrees" if spec.lat_col else "none",
    )


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
    user: np.ndarray,
    weekday: np.ndarray,
    hour: np.ndarray,
    order: np.ndarray | None,
    order_numeric: bool | None = None,
) -> tuple[np.ndarray, str]:
    """Monotonic per-user time [R] int64 from weekday/hour (+ trajectory order) and file order. The order
    column orders as integers when every value is one (``order_numeric``: decided over the whole file by a
    caller that passes whole users in parts), else as text."""
    n = len(user)
    _, ucode = np.unique(user, return_inverse=True)
    ocode = np.zeros(n, dtype=np.int64)
    if order is not None:
        num, ok = parse_int(order)
        numeric = ok.all() if order_numeric is None else order_numeric
        ocode = num if numeric else np.unique(order, return_inverse=True)[1].reshape(-1)
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
