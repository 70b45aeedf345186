"""One reader per data set -> a `RecordTable` (one row per kept input row) plus drop accounting.

Readers only parse and validate; sorting, de-duplication, windows and splits live in windows.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from nextlocmoe.data.parsing import (
    DataError,
    ids_as_int_if_all,
    load_npy,
    local_weekday_hour,
    parse_float,
    parse_id,
    parse_int,
    read_csv_columns,
    sha256_file,
)

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
FSQ_NYC_ORIGIN = "2012-04-03T18:00:00+00:00"
FSQ_NYC_TZ = "America/New_York"


@dataclass
class RecordTable:
    """Parsed rows of one data set, N = kept rows, in file order.

    user, venue: [N] original ids (int64 or str). t_min: [N] int64 minutes since `time_origin`.
    lat, lon: [N] float64 (NaN when the data has no coordinates). dur_min: [N] float64 stay length or None.
    category: [N] str ('' unknown) or None. weekday (0 = Monday), hour: [N] int8 local time.
    split: [N] int8 (0 train, 1 valid, 2 test) from the data set's own split, or None (split by time).
    """

    dataset: str
    user: np.ndarray
    venue: np.ndarray
    t_min: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    weekday: np.ndarray
    hour: np.ndarray
    input_rows: int
    dropped: Counter
    source_sha256: dict[str, str]
    time_origin: str
    dur_min: np.ndarray | None = None
    category: np.ndarray | None = None
    split: np.ndarray | None = None
    coordinate_units: str = "degrees"
    extra: dict = field(default_factory=dict)
    drop_examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first "file:line" rows
    drop_first: dict[str, str] = field(default_factory=dict)  # reason -> "file:line: field=value" (first)

    def __len__(self) -> int:
        return len(self.t_min)

    def select(self, keep: np.ndarray) -> dict[str, np.ndarray | None]:
        """Row-wise arrays restricted to the boolean/index selection `keep` (None stays None)."""
        names = ["user", "venue", "t_min", "lat", "lon", "weekday", "hour", "dur_min", "category", "split"]
        return {n: (None if getattr(self, n) is None else getattr(self, n)[keep]) for n in names}


def valid_latlon(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """[R] bool: finite, in range, and not the (0, 0) null island placeholder."""
    ok = np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180)
    return ok & ~((lat == 0) & (lon == 0))


def _files_in(source: Path, names: list[str]) -> list[Path]:
    if not source.is_dir():
        raise DataError(f"{source}: expected a directory holding {names}")
    paths = [source / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"missing source file(s): {missing}")
    return paths


def fsq_poi(poi_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NYC_POI.npy -> (venue id [V] int64 sorted, lat [V], lon [V] float64)."""
    poi = load_npy(poi_path, 3, "fiu", "rows [venue_id, latitude, longitude]").astype(np.float64)
    poi_id = poi[:, 0]
    if np.any(poi_id != np.floor(poi_id)) or len(np.unique(poi_id)) != len(poi_id):
        raise DataError(f"{poi_path}: venue ids (column 0) must be unique integers")
    order = np.argsort(poi_id)
    return poi_id[order].astype(np.int64), poi[order, 1], poi[order, 2]


def fsq_chunk(
    checkins: np.ndarray, start: int, poi: tuple, name: str, acct: tuple, tz: str = FSQ_NYC_TZ
) -> dict[str, np.ndarray]:
    """Rows start.. of NYC.npy ([n, 3] int64) -> kept rows' columns (user, venue, t_min, lat, lon, weekday,
    hour); drops counted into ``acct`` = (dropped Counter, examples, first), noted as '{name} row i'."""
    poi_id, poi_lat, poi_lon = poi
    user, venue, t = checkins[:, 0], checkins[:, 1], checkins[:, 2]
    j = np.clip(np.searchsorted(poi_id, venue), 0, len(poi_id) - 1)
    known = poi_id[j] == venue
    lat, lon = np.where(known, poi_lat[j], np.nan), np.where(known, poi_lon[j], np.nan)
    bad_xy = ~valid_latlon(lat, lon)
    reasons = [
        ("unknown_venue", ~known, [("venue_id (column 1, not in NYC_POI.npy)", ~known, venue)]),
        ("bad_coordinate", bad_xy, [("NYC_POI.npy latitude", bad_xy, lat), ("longitude", bad_xy, lon)]),
        ("unparsable_time", t < 0, [("t_minutes (column 2)", t < 0, t)]),
    ]
    rows = np.arange(start, start + len(t))
    keep = _apply_reasons(reasons, acct[0], len(t), acct[1], (f"{name} row ", rows), acct[2])
    origin_utc_min = int(datetime.fromisoformat(FSQ_NYC_ORIGIN).timestamp() // 60)
    weekday, hour = local_weekday_hour(t[keep] + origin_utc_min, tz)
    cols = {"user": user, "venue": venue, "t_min": t, "lat": lat, "lon": lon}
    return {k: v[keep] for k, v in cols.items()} | {"weekday": weekday, "hour": hour}


FSQ_TIME_ORIGIN = (
    f"t_min = NYC.npy column 2 = minutes elapsed since {FSQ_NYC_ORIGIN} (assumed: the first check-in of the "
    f"raw TSMC2014 NYC set, 2012-04-03 14:00 New York local time); weekday/hour are {FSQ_NYC_TZ} local wall "
    "clock (DST-aware). Evidence: with this origin the hourly check-in profile has its trough at 04h and "
    "peaks at 08h/12h/19h, and the profile shifts by 1 h at the 2012-11-04 DST change; a "
    "local-midnight origin would put the trough at 13-14h. Still an assumption: the release does "
    "not document the origin."
)


def read_fsq_nyc(source: Path) -> RecordTable:
    """STAN's Foursquare NYC release: NYC.npy int [R,3] (user, venue, t minutes), NYC_POI.npy float [V,3]."""
    checkins_path, poi_path = _files_in(Path(source), ["NYC.npy", "NYC_POI.npy"])
    checkins = load_npy(checkins_path, 3, "iu", "int rows [user_id, venue_id, t_minutes]").astype(np.int64)
    poi = fsq_poi(poi_path)
    acct: tuple = (Counter(), {}, {})
    c = fsq_chunk(checkins, 0, poi, checkins_path.name, acct)
    return RecordTable(
        dataset="fsq-nyc",
        user=c["user"],
        venue=c["venue"],
        t_min=c["t_min"],
        lat=c["lat"],
        lon=c["lon"],
        weekday=c["weekday"],
        hour=c["hour"],
        input_rows=len(checkins),
        dropped=acct[0],
        source_sha256={p.name: sha256_file(p) for p in (checkins_path, poi_path)},
        drop_examples=acct[1],
        drop_first=acct[2],
        time_origin=FSQ_TIME_ORIGIN,
    )


MAX_DROP_EXAMPLES = 5


def note_drops(examples: dict[str, list[str]], reason: str, where: str, rows) -> None:
    """Remember the first few dropped rows of a reason as 'file:line' (or 'file row i') for the manifest."""
    have = examples.setdefault(reason, [])
    for r in list(rows)[: max(0, MAX_DROP_EXAMPLES - len(have))]:
        have.append(f"{where}{int(r)}")


Reason = tuple  # (name, [n] bad) or (name, [n] bad, [(field, [n] field bad, [n] raw values), ...])


def _apply_reasons(
    reasons: list[Reason],
    dropped: Counter,
    n: int,
    examples: dict[str, list[str]] | None = None,
    where: tuple[str, np.ndarray] | None = None,
    first: dict[str, str] | None = None,
) -> np.ndarray:
    """Count each row under its FIRST failing reason; returns the [n] bool keep mask. With ``where`` =
    (prefix, [n] line/row numbers) the first dropped rows of each reason are noted in ``examples``, and in
    ``first`` the first one as "file:line: field='value'" (the first failing field of the reason's)."""
    keep = np.ones(n, dtype=bool)
    for name, bad, *details in reasons:
        hit = keep & bad
        dropped[name] += int(hit.sum())
        if examples is not None and where is not None and hit.any():
            note_drops(examples, name, where[0], where[1][hit])
            if first is not None and name not in first:
                first[name] = _describe(int(np.argmax(hit)), where, details[0] if details else [])
        keep &= ~bad
    return keep


def _describe(i: int, where: tuple[str, np.ndarray], details: list) -> str:
    """'file:line: field=value' of dropped row ``i`` (every failing field of the reason's, comma-joined)."""
    parts = [f"{f}={str(v[i])!r}" for f, fbad, v in details if fbad[i]]
    return f"{where[0]}{int(where[1][i])}" + (f": {', '.join(parts)}" if parts else "")


def first_drop_line(dropped: Counter, first: dict[str, str]) -> str:
    """The dominant drop reason with its count and first example, for 'no usable rows' errors."""
    live = {k: v for k, v in dropped.items() if v}
    if not live:
        return "no data rows"
    top = max(live, key=lambda k: live[k])
    others = {k: v for k, v in sorted(live.items()) if k != top}
    text = f"{live[top]} dropped as {top}"
    if top in first:
        text += f", first at {first[top]}"
    return text + (f"; also {others}" if others else "")


LLMMOB_FILES = {
    "llmmob-fsq-nyc": ("foursquare", ["latitude", "longitude"]),
    "llmmob-geolife": ("geolife", ["duration"]),
}


def read_llmmob(source: Path, dataset: str) -> RecordTable:
    """LLM-Mob CSVs {prefix}_{train,valid,test}.csv; t = start_day * 1440 + start_min; own split per file."""
    prefix, extra_cols = LLMMOB_FILES[dataset]
    paths = _files_in(Path(source), [f"{prefix}_{s}.csv" for s in SPLIT_CODES])
    required = ["user_id", "location_id", "start_day", "start_min", "weekday"] + extra_cols
    parts: list[dict[str, np.ndarray]] = []
    dropped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    first: dict[str, str] = {}
    input_rows, sha = 0, {}
    for path, code in zip(paths, SPLIT_CODES.values(), strict=True):
        c = read_csv_columns(path, required)
        input_rows, sha[path.name] = input_rows + c.n_rows, c.sha256  # hash of the bytes read
        note_malformed(c, dropped, examples, first)
        part = _parse_llmmob_part(c.cols, dataset, dropped, examples, (f"{path.name}:", c.lines), first)
        part["split"] = np.full(len(part["t_min"]), code, dtype=np.int8)
        parts.append(part)
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    # ids are text (e.g. Foursquare hex venue ids); integers only when every id of the data set is one
    cols["user"], cols["venue"] = ids_as_int_if_all(cols["user"]), ids_as_int_if_all(cols["venue"])
    n = len(cols["t_min"])
    no_coord = np.full(n, np.nan)
    origin = "start_day 0, 00:00 of the LLM-Mob preprocessing (calendar date not published)"
    table = RecordTable(
        dataset=dataset,
        user=cols["user"],
        venue=cols["venue"],
        t_min=cols["t_min"],
        lat=cols.get("lat", no_coord),
        lon=cols.get("lon", no_coord),
        weekday=cols["weekday"],
        hour=cols["hour"],
        input_rows=input_rows,
        dropped=dropped,
        source_sha256=sha,
        drop_examples=examples,
        drop_first=first,
        time_origin=f"t_min = start_day * 1440 + start_min, minutes since {origin}; weekday from the file's "
        "weekday column, hour = start_min // 60 (local time of the source)",
        dur_min=cols.get("dur"),
        split=cols["split"],
        coordinate_units="normalised" if dataset == "llmmob-fsq-nyc" else "none",
    )
    return table


def note_malformed(c, dropped: Counter, examples: dict, first: dict) -> None:
    """Count a CsvColumns' wrong-column-count rows under malformed_row (file:line examples)."""
    dropped["malformed_row"] += c.n_malformed
    note_drops(examples, "malformed_row", f"{c.path.name}:", c.malformed_lines)
    if c.malformed_lines and "malformed_row" not in first:
        first["malformed_row"] = (
            f"{c.path.name}:{c.malformed_lines[0]}: wrong column count (header has {len(c.header)})"
        )


def _parse_llmmob_part(
    raw: dict[str, np.ndarray],
    dataset: str,
    dropped: Counter,
    examples: dict,
    where: tuple,
    first: dict,
    with_keep: bool = False,
):
    """Parsed kept rows of one LLM-Mob CSV (chunk); ``with_keep``: also the [n] keep mask."""
    user, ok_u = parse_id(raw["user_id"])
    venue, ok_v = parse_id(raw["location_id"])
    day, ok_d = parse_int(raw["start_day"])
    minute, ok_m = parse_int(raw["start_min"])
    weekday, ok_w = parse_int(raw["weekday"])
    ok_d &= day >= 0
    ok_m &= (minute >= 0) & (minute < 1440)
    ok_w &= (weekday >= 0) & (weekday < 7)
    ok_t = ok_d & ok_m & ok_w
    id_detail = [("user_id", ~ok_u, raw["user_id"]), ("location_id", ~ok_v, raw["location_id"])]
    t_detail = [(f, ~ok, raw[f]) for f, ok in (("start_day", ok_d), ("start_min", ok_m), ("weekday", ok_w))]
    reasons = [("missing_field", ~(ok_u & ok_v), id_detail), ("unparsable_time", ~ok_t, t_detail)]
    out: dict[str, np.ndarray] = {}
    if dataset == "llmmob-fsq-nyc":
        lat, ok_a = parse_float(raw["latitude"])
        lon, ok_o = parse_float(raw["longitude"])
        ok_a &= np.abs(lat) <= 1.0
        ok_o &= np.abs(lon) <= 1.0
        detail = [("latitude", ~ok_a, raw["latitude"]), ("longitude", ~ok_o, raw["longitude"])]
        reasons.append(("bad_coordinate", ~(ok_a & ok_o), detail))
        out.update(lat=lat, lon=lon)
    else:
        dur, ok_dur = parse_float(raw["duration"])
        ok_dur &= dur >= 0
        reasons.append(("bad_duration", ~ok_dur, [("duration", ~ok_dur, raw["duration"])]))
        out["dur"] = dur
    keep = _apply_reasons(reasons, dropped, len(user), examples, where, first)
    out.update(user=user, venue=venue, t_min=day * 1440 + minute, weekday=weekday.astype(np.int8))
    out["hour"] = (minute // 60).astype(np.int8)
    kept = {k: v[keep] for k, v in out.items()}
    return (kept, keep) if with_keep else kept
