"""Raw records of one user -> the columns the featurizer reads (docs/SERVING.md "What a request gets").

A raw record is (venue id, time, optional lat/lon). Time: unix seconds or ISO-8601 (offset-aware ISO is
converted to UTC; naive ISO is taken as UTC), the same parser as ``prepare --dataset csv``; weekday/hour are
taken in the engine's time zone (the training data's). Records are kept in time order (ties: arrival
order), and a repeat of (venue, minute) is dropped, as ``prepare`` does. A known venue takes the engine's
coordinates (the training location table's); a venue the engine has never seen enters the windows by its
lat/lon with location index -1 (its coordinates feed the record embedding; the pointer cannot copy it and it
cannot be a candidate: the candidates are the engine's venues). An unknown venue without coordinates is
refused. ``RequestError`` carries one line naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nextlocmoe.data.parsing import local_weekday_hour, parse_time_minutes
from nextlocmoe.geo import latlon_to_mercator
from nextlocmoe.serve.engine import Engine


class RequestError(ValueError):
    """A request (or input row) that cannot be answered; the message names the field and value."""


def parse_time(value: Any, what: str = "time") -> int:
    """Unix seconds (number or text) or ISO-8601 text -> integer minutes since 1970 UTC (floored)."""
    if isinstance(value, bool) or value is None:
        raise RequestError(f"{what}: expected unix seconds or ISO-8601 text, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise RequestError(f"{what}: not a finite number ({value!r})")
        return int(math.floor(value / 60.0))
    mins, ok = parse_time_minutes(np.array([str(value)]))
    if not ok[0] or not math.isfinite(mins[0]):
        raise RequestError(f"{what}: cannot parse {value!r} (unix seconds or ISO-8601)")
    return int(math.floor(mins[0]))


def parse_times(values: list[Any], what: str = "records") -> np.ndarray:
    """Many times at once (``parse_time`` rules) -> [n] int64 minutes; RequestError names the first bad
    one."""
    out = np.empty(len(values), dtype=np.int64)
    text = [i for i, v in enumerate(values) if isinstance(v, str)]
    if text:
        mins, ok = parse_time_minutes(np.array([values[i] for i in text]))
        for j, i in enumerate(text):
            if not ok[j] or not math.isfinite(mins[j]):
                raise RequestError(f"{what}[{i}].time: cannot parse {values[i]!r} (unix seconds or ISO-8601)")
            out[i] = math.floor(mins[j])
    for i, v in enumerate(values):
        if not isinstance(v, str):
            out[i] = parse_time(v, f"{what}[{i}].time")
    return out


def iso_minutes(t_min: int) -> str:
    return str(np.datetime64(int(t_min), "m")) + "Z"


class VenueIndex:
    """Original venue id (as text or number) -> engine index (-1 when unknown)."""

    def __init__(self, ids: np.ndarray) -> None:
        self.int_ids = ids.dtype.kind in "iu"
        self.map = {(int(v) if self.int_ids else str(v)): i for i, v in enumerate(ids.tolist())}

    def lookup(self, venue: Any) -> int:
        key: Any = str(venue).strip()
        if self.int_ids:
            try:
                key = int(float(key)) if "." in key else int(key)
            except ValueError:
                return -1
        return self.map.get(key, -1)


@dataclass
class UserHistory:
    """One user's records in time order, at most ``keep`` of them (the newest): loc [n] (engine index,
    -1 unknown venue), x, y [n] metres, t_min [n] minutes since 1970 UTC, weekday, hour [n] in time zone
    ``tz`` (computed once, when a record is added)."""

    keep: int
    tz: str | None = None
    loc: list[int] = field(default_factory=list)
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    t_min: list[int] = field(default_factory=list)
    weekday: list[int] = field(default_factory=list)
    hour: list[int] = field(default_factory=list)

    def _lists(self) -> tuple[list, ...]:
        return (self.loc, self.x, self.y, self.t_min, self.weekday, self.hour)

    def __len__(self) -> int:
        return len(self.t_min)

    def copy(self) -> UserHistory:
        return UserHistory(self.keep, self.tz, *(list(v) for v in self._lists()))

    def add(
        self, loc: int, x: float, y: float, t: int, allow_past: bool = False, wd_hr: tuple | None = None
    ) -> bool:
        """Append one record; False when it repeats the last (venue, minute). An earlier time than the last
        record is a RequestError unless ``allow_past`` (then it is inserted in order). ``wd_hr``: its
        weekday and hour when already computed (else from ``t`` in ``tz``)."""
        if self.t_min and t < self.t_min[-1]:
            if not allow_past:
                last = iso_minutes(self.t_min[-1])
                raise RequestError(
                    f"time {iso_minutes(t)} is before the user's last record ({last}): events must arrive in "
                    "time order"
                )
            i = int(np.searchsorted(np.array(self.t_min), t, side="right"))
        else:
            i = len(self.t_min)
        j = i - 1
        while j >= 0 and self.t_min[j] == t:
            if self.loc[j] == loc and (loc >= 0 or (self.x[j], self.y[j]) == (x, y)):
                return False
            j -= 1
        wd, hr = (
            wd_hr if wd_hr is not None else (int(v[0]) for v in local_weekday_hour(np.array([t]), self.tz))
        )
        for lst, v in zip(self._lists(), (loc, x, y, t, int(wd), int(hr)), strict=True):
            lst.insert(i, v)
        if len(self.t_min) > self.keep:
            for lst in self._lists():
                del lst[: len(lst) - self.keep]
        return True

    def extend(
        self, parsed: list[tuple[int, float, float]], t: np.ndarray, wd: np.ndarray, hr: np.ndarray
    ) -> None:
        """Append records known to be strictly later than the last one and than each other (no repeats)."""
        if parsed:
            loc, x, y = (list(v) for v in zip(*parsed, strict=True))
            for lst, v in zip(self._lists(), (loc, x, y, t.tolist(), wd.tolist(), hr.tolist()), strict=True):
                lst.extend(v)
        if len(self.t_min) > self.keep:
            for lst in self._lists():
                del lst[: len(lst) - self.keep]

    def before(self, t: int) -> int:
        """Number of records strictly before minute ``t``."""
        return int(np.searchsorted(np.array(self.t_min, dtype=np.int64), t, side="left"))


def record_xy(engine: Engine, index: VenueIndex, venue: Any, lat: Any, lon: Any) -> tuple[int, float, float]:
    """(engine index or -1, x, y metres) of one raw record; RequestError for an unknown venue without valid
    coordinates, or invalid coordinates given for it."""
    loc = index.lookup(venue)
    if loc >= 0:
        return loc, float(engine.venues["x"][loc]), float(engine.venues["y"][loc])
    if lat is None or lon is None:
        raise RequestError(f"venue {venue!r} is not in the engine's venue table and has no lat/lon")
    try:
        la, lo = float(lat), float(lon)
    except (TypeError, ValueError):
        raise RequestError(f"venue {venue!r}: lat/lon not numbers ({lat!r}, {lon!r})") from None
    if not (math.isfinite(la) and math.isfinite(lo) and abs(la) <= 90 and abs(lo) <= 180) or (la, lo) == (
        0,
        0,
    ):
        raise RequestError(
            f"venue {venue!r}: bad coordinates lat={lat!r}, lon={lon!r} (NaN, out of range or 0,0)"
        )
    x, y = latlon_to_mercator(np.array([la]), np.array([lo]))
    return -1, float(x[0]), float(y[0])


def sequence(hist: UserHistory, n: int, at: int, window: int) -> dict[str, np.ndarray]:
    """The featurizer's rows for a query at minute ``at``: the last ``window`` of the first ``n`` records
    of ``hist`` (those before ``at``) + the query row (loc -1, x/y NaN) last."""
    a = max(0, n - window)
    t = np.array(hist.t_min[a:n] + [at], dtype=np.int64)
    qwd, qhr = local_weekday_hour(np.array([at]), hist.tz)
    wd = np.array(hist.weekday[a:n] + [int(qwd[0])], dtype=np.int8)
    hr = np.array(hist.hour[a:n] + [int(qhr[0])], dtype=np.int8)
    return {
        "loc": np.array(hist.loc[a:n] + [-1], dtype=np.int64),
        "x": np.array(hist.x[a:n] + [math.nan], dtype=np.float64),
        "y": np.array(hist.y[a:n] + [math.nan], dtype=np.float64),
        "t_min": t,
        "weekday": wd,
        "hour": hr,
    }
