"""RecordTable -> sorted records, dense location table, durations, splits and sample (target) indices."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from nextlocmoe.data.sources import RecordTable
from nextlocmoe.geo import haversine_m, latlon_to_mercator

SPLIT_FRACTIONS = (0.7, 0.8)  # cumulative: first 70 % train, next 10 % valid, last 20 % test (per user)
SPLITS = ("train", "valid", "test")


@dataclass
class Prepared:
    """Records sorted by (user, time, file order), N rows; locations L rows; users U.

    records: user, loc (int32 dense), t_min (int64), x, y (float64 Web-Mercator m, NaN without coordinates),
    weekday, hour (int8), dur_min (float32), split (int8 0/1/2), pos (int32 index within the user's sequence).
    locations: id (original), lat, lon, x, y [L] float64, category [L] str ('' none), count [L] int64.
    user_ids: [U] original user ids. samples: split name -> [S] int64 target record indices.
    """

    records: dict[str, np.ndarray]
    locations: dict[str, np.ndarray]
    user_ids: np.ndarray
    samples: dict[str, np.ndarray]
    dropped: Counter
    info: dict = field(default_factory=dict)


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense codes [R] int64 and the sorted unique values."""
    uniq, inv = np.unique(values, return_inverse=True)
    return inv.reshape(-1).astype(np.int64), uniq


def _mode_per_group(group: np.ndarray, keys: list[np.ndarray], n_groups: int) -> np.ndarray:
    """For each group g in 0..n_groups-1 the index of one row holding its most frequent key tuple
    (ties -> smallest key); -1 for groups with no rows. group, keys: [R]."""
    if len(group) == 0:
        return np.full(n_groups, -1, dtype=np.int64)
    order = np.lexsort(tuple(reversed([group] + keys)))
    sk = [a[order] for a in [group] + keys]
    start = np.r_[True, np.any([a[1:] != a[:-1] for a in sk], axis=0)]
    run_id = np.cumsum(start) - 1
    counts = np.bincount(run_id)
    first = order[start]
    run_group = group[first]
    best = np.lexsort((np.arange(len(counts)), -counts, run_group))
    chosen = np.full(n_groups, -1, dtype=np.int64)
    take = np.r_[True, run_group[best][1:] != run_group[best][:-1]]
    chosen[run_group[best][take]] = first[best][take]
    return chosen


def _location_table(loc: np.ndarray, ids: np.ndarray, cols: dict, info: dict) -> dict[str, np.ndarray]:
    """Per location: the most frequent (lat, lon) of its rows, majority category, row count."""
    n_loc = len(ids)
    has = np.isfinite(cols["lat"]) & np.isfinite(cols["lon"])
    pick = _mode_per_group(loc[has], [cols["lat"][has], cols["lon"][has]], n_loc)
    rows = np.flatnonzero(has)
    lat = np.where(pick >= 0, cols["lat"][rows[np.maximum(pick, 0)]] if has.any() else np.nan, np.nan)
    lon = np.where(pick >= 0, cols["lon"][rows[np.maximum(pick, 0)]] if has.any() else np.nan, np.nan)
    if has.any():
        info["location_coordinate_spread_m"] = coordinate_spread(loc, cols["lat"], cols["lon"], lat, lon)
    x, y = latlon_to_mercator(lat, lon)
    category = np.full(n_loc, "", dtype=object)
    if cols.get("category") is not None:
        cat = cols["category"].astype(str)
        known = np.char.str_len(cat) > 0
        pick_c = _mode_per_group(loc[known], [cat[known]], n_loc)
        ok = pick_c >= 0
        category[ok] = cat[known][pick_c[ok]]
    category = category.astype(str)
    return {
        "id": ids,
        "lat": lat,
        "lon": lon,
        "x": x,
        "y": y,
        "category": category,
        "count": np.bincount(loc, minlength=n_loc).astype(np.int64),
    }


def coordinate_spread(loc: np.ndarray, lat: np.ndarray, lon: np.ndarray, loc_lat, loc_lon, into=None) -> dict:
    """How far records' own coordinates ([R] lat/lon of location codes loc [R]) lie from their location's
    chosen one ([L] loc_lat/loc_lon); rows without coordinates are skipped. ``into``: an earlier batch's
    result to add to."""
    has = np.isfinite(lat) & np.isfinite(lon)
    spread = haversine_m(lat[has], lon[has], loc_lat[loc[has]], loc_lon[loc[has]])
    out = into or {
        "note": "rows of one location id with other coordinates than its most frequent one; records use "
        "the location's (most frequent) coordinate",
        "rows_off_by_more_than_10m": 0,
        "max": 0.0,
    }
    out["rows_off_by_more_than_10m"] += int((spread > 10).sum())
    out["max"] = max(out["max"], float(spread.max())) if len(spread) else out["max"]
    return out


def user_durations(
    user: np.ndarray, t: np.ndarray, given: np.ndarray | None, cap: float
) -> tuple[np.ndarray, str]:
    """Stay length per sorted record [N] float32 minutes, capped at `cap`."""
    last = np.append(user[1:] != user[:-1], True)
    gap = np.append(np.diff(t), 0).astype(np.float64)
    gap = np.minimum(np.where(last, np.nan, gap), cap)
    if given is not None:
        dur = np.where(np.isfinite(given), np.minimum(given, cap), gap)
        rule = f"the data set's stay duration (minutes), capped at {cap:g}"
    else:
        dur = gap
        rule = f"time to the user's next record (minutes), capped at {cap:g}"
    # last record of each user (or any still-missing value): the user's median of the other durations
    missing = ~np.isfinite(dur)
    if missing.any():
        med = _user_median(user, dur)
        dur[missing] = med[user[missing]]
        dur = np.where(np.isfinite(dur), dur, 0.0)
    rule += "; a user's last record (no next record) gets that user's median duration"
    return dur.astype(np.float32), rule


def _user_median(user: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[U] median of finite values per user code (NaN when none); user sorted ascending."""
    out = np.full(int(user.max()) + 1, np.nan)
    bounds = np.flatnonzero(np.concatenate(([True], user[1:] != user[:-1], [True])))
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        v = values[a:b]
        v = v[np.isfinite(v)]
        if len(v):
            out[user[a]] = np.median(v)
    return out


def _time_split(pos: np.ndarray, n_user: np.ndarray) -> np.ndarray:
    """[N] int8 split code from the position within the user's sequence and the user's record count."""
    n_train = np.floor(SPLIT_FRACTIONS[0] * n_user)
    n_trval = np.floor(SPLIT_FRACTIONS[1] * n_user)
    return np.where(pos < n_train, 0, np.where(pos < n_trval, 1, 2)).astype(np.int8)


def build(
    table: RecordTable, history: int, current: int, min_history: int, duration_cap_min: float
) -> Prepared:
    """De-duplicate, drop too-short users, sort, build locations, durations, splits and samples."""
    dropped = Counter(table.dropped)
    n = len(table)
    ucode, user_ids = _codes(table.user)
    vcode, _ = _codes(table.venue)
    row = np.arange(n)
    order = np.lexsort((row, table.t_min, vcode, ucode))
    same = (ucode[order][1:] == ucode[order][:-1]) & (vcode[order][1:] == vcode[order][:-1])
    same &= table.t_min[order][1:] == table.t_min[order][:-1]
    dup = np.zeros(n, dtype=bool)
    dup[order[1:][same]] = True
    dropped["duplicate"] += int(dup.sum())
    counts = np.bincount(ucode[~dup], minlength=len(user_ids))
    short = (counts < current + 1 + min_history)[ucode] & ~dup
    dropped["user_too_short"] += int(short.sum())
    keep = ~dup & ~short
    order = np.lexsort((row[keep], table.t_min[keep], ucode[keep]))
    cols = {k: (None if v is None else v[order]) for k, v in table.select(keep).items()}
    ucode, user_ids = _codes(cols["user"])
    loc, loc_ids = _codes(cols["venue"])
    info: dict = {}
    locations = _location_table(loc, loc_ids, cols, info)
    if table.coordinate_units == "normalised":  # not degrees: keep the source units, x = lon, y = lat
        locations["x"], locations["y"] = locations["lon"].copy(), locations["lat"].copy()
    pos, dur, split = per_user(ucode, cols["t_min"], cols["dur_min"], cols["split"], duration_cap_min, info)
    records = {
        "user": ucode.astype(np.int32),
        "loc": loc.astype(np.int32),
        "t_min": cols["t_min"].astype(np.int64),
        "x": locations["x"][loc],
        "y": locations["y"][loc],
        "weekday": cols["weekday"].astype(np.int8),
        "hour": cols["hour"].astype(np.int8),
        "dur_min": dur,
        "split": split,
        "pos": pos.astype(np.int32),
    }
    samples, info["targets_without_full_window"] = sample_targets(pos, split, current, min_history)
    return Prepared(records, locations, user_ids, samples, dropped, info)


def per_user(
    ucode: np.ndarray,
    t_min: np.ndarray,
    dur: np.ndarray | None,
    split: np.ndarray | None,
    cap: float,
    info: dict,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Records [N] sorted by (user, time) -> (pos [N] within the user, dur_min [N] float32, split [N] int8);
    the rules go into ``info``. Needs whole users only (the streaming prepare passes them in batches)."""
    starts = np.flatnonzero(np.r_[True, ucode[1:] != ucode[:-1]])
    n_user = np.diff(np.r_[starts, len(ucode)])
    pos = np.arange(len(ucode)) - np.repeat(starts, n_user)
    dur, info["duration"] = user_durations(ucode - ucode[0] if len(ucode) else ucode, t_min, dur, cap)
    if split is not None:
        split = split.astype(np.int8)
        info["split_method"] = (
            "the data set's own split (one file per split); inputs may come from any earlier record"
        )
    else:
        split = _time_split(pos, np.repeat(n_user, n_user))
        info["split_method"] = (
            "by time per user: first 70% of a user's records train, next 10% valid, last 20% test"
        )
    return pos, dur, split


def sample_targets(
    pos: np.ndarray, split: np.ndarray, current: int, min_history: int
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Sample (target) record indices per split [S] int64, and per split the targets without a full
    window (pos < current + min_history)."""
    eligible = pos >= current + min_history
    samples = {s: np.flatnonzero(eligible & (split == i)).astype(np.int64) for i, s in enumerate(SPLITS)}
    without = {s: int(((~eligible) & (split == i)).sum()) for i, s in enumerate(SPLITS)}
    return samples, without
