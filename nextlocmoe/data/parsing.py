"""Low-level readers and vectorised parsers for CSV and .npy sources.

Every parser returns values plus a boolean ``ok`` mask so callers can count bad rows under a named drop reason
instead of failing. Structural problems (unreadable file, missing header column, wrong .npy shape) raise
`DataError` with the file (and line / field where it applies).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from nextlocmoe.data.csvread import (  # noqa: F401 - the CSV readers' names, as before
    CsvColumns,
    IrregularCsv,
    iter_csv_columns,
    iter_parquet_columns,
    numpy_columns,
    read_csv_columns,
    sha256_file,
)
from nextlocmoe.data.errors import DataError

WEEKDAY_NAMES = {
    name: i
    for i, names in enumerate(
        [("monday", "mon"), ("tuesday", "tue"), ("wednesday", "wed"), ("thursday", "thu"), ("friday", "fri")]
        + [("saturday", "sat"), ("sunday", "sun")]
    )
    for name in names
}
EPOCH = datetime(1970, 1, 1)


def load_npy(path: Path, ncols: int, kinds: str, what: str, mmap: bool = False) -> np.ndarray:
    """Load a 2-D .npy array [R, ncols] with dtype kind in `kinds` ('iu', 'f', ...); DataError otherwise.
    ``mmap``: memory-mapped read-only (the streaming prepare reads it in chunks)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found ({what})")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise DataError(f"{path}: not a .npy file (no NumPy header; {what})")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as e:
        if "pickle" in str(e) or "Python objects" in str(e):  # an object array: unpickling could run code
            raise DataError(f"{path}: holds pickled Python objects, refused (expected {what})") from None
        raise DataError(f"{path}: cannot read .npy ({e})") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read .npy ({e})") from None
    if arr.ndim != 2 or arr.shape[1] != ncols:
        raise DataError(f"{path}: expected a 2-D array [rows, {ncols}] ({what}), got shape {arr.shape}")
    if arr.dtype.kind not in kinds:
        raise DataError(f"{path}: expected dtype kind in {kinds!r} ({what}), got {arr.dtype}")
    return arr


def parse_float(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[R] str -> ([R] float64, [R] bool ok); garbled, empty or non-finite values are not ok (NaN).
    Arrow's cast (correctly rounded, like Python's float) converts a column that parses whole; any other
    goes value by value."""
    if values.dtype.kind in "OU" and len(values):
        import pyarrow as pa
        import pyarrow.compute as pc

        try:
            out = pc.cast(pa.array(values, type=pa.string()), pa.float64()).to_numpy(zero_copy_only=False)
            return out, np.isfinite(out)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    try:
        out = values.astype(np.float64)
    except ValueError:
        out = np.empty(len(values), dtype=np.float64)
        for i, v in enumerate(values):
            try:
                out[i] = float(v)
            except ValueError:
                out[i] = np.nan
    return out, np.isfinite(out)


def parse_int(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[R] str -> ([R] int64, [R] bool ok); accepts '12' and '12.0', rejects '12.5', garbage, empty."""
    f, ok = parse_float(values)
    ok &= np.floor(f) == f
    out = np.where(ok, f, 0).astype(np.int64)
    return out, ok


_INT_ID = re.compile(r"^[+-]?\d+(\.0*)?$")


def parse_id(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[R] str ids (any text: integers, Foursquare hex venue ids, names) -> ([R] stripped str, [R] bool ok);
    an empty id is not ok."""
    ids = np.char.strip(values.astype(str))
    return ids, np.char.str_len(ids) > 0


def ids_as_int_if_all(ids: np.ndarray) -> np.ndarray:
    """[R] str ids -> int64 when every one is an integer and distinct strings stay distinct ids ('7' and
    '07' would merge, so they stay strings); else the str ids unchanged. Integer ids keep numeric order."""
    if not len(ids):
        return ids
    uniq = np.unique(ids)
    if not all(_INT_ID.match(u) and len(u.split(".")[0].lstrip("+-")) <= 18 for u in uniq):
        return ids
    num = np.array([int(float(u)) if "." in u else int(u) for u in uniq], dtype=np.int64)
    if len(np.unique(num)) != len(uniq):
        return ids
    return num[np.searchsorted(uniq, ids)]


def _iso_minutes(v: str) -> float:
    """One ISO-8601 timestamp -> minutes since 1970-01-01 (aware -> UTC, naive -> as written)."""
    s = v.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return (dt - EPOCH).total_seconds() / 60.0


def parse_time_minutes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[R] str (unix seconds or ISO-8601) -> ([R] float64 minutes since 1970-01-01, [R] bool ok)."""
    secs, ok = parse_float(values)
    out = secs / 60.0
    for i in np.flatnonzero(~ok):
        try:
            out[i] = _iso_minutes(str(values[i]))
            ok[i] = True
        except ValueError:
            out[i] = np.nan
    return out, ok


def parse_weekday(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[R] str weekday names ('Monday', 'mon') or integers 0..6 (0 = Monday) -> ([R] int64, [R] bool ok)."""
    low = np.char.lower(np.char.strip(values.astype(str)))
    uniq, inv = np.unique(low, return_inverse=True)
    table = np.full(len(uniq), -1, dtype=np.int64)
    for j, u in enumerate(uniq):
        if u in WEEKDAY_NAMES:
            table[j] = WEEKDAY_NAMES[u]
        elif u.isdigit() and int(u) < 7:
            table[j] = int(u)
    out = table[inv.reshape(-1)]
    return out, out >= 0


def local_weekday_hour(utc_min: np.ndarray, tz: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Minutes since 1970-01-01 UTC [R] -> (weekday [R] int8, 0 = Monday; hour [R] int8) in time zone `tz`
    (IANA name, DST-aware via zoneinfo; None = the minutes already are the wall clock)."""
    utc_min = np.asarray(utc_min, dtype=np.int64)
    local = utc_min
    if tz:
        try:
            from zoneinfo import ZoneInfo

            zone = ZoneInfo(tz)
        except Exception as e:  # noqa: BLE001 - zoneinfo raises several types for bad names / no tzdata
            raise DataError(f"unknown time zone {tz!r} ({e})") from e
        hours, inv = np.unique(utc_min // 60, return_inverse=True)
        off_min = np.array(
            [datetime.fromtimestamp(int(h) * 3600, zone).utcoffset().total_seconds() // 60 for h in hours],
            dtype=np.int64,
        )
        local = utc_min + off_min[inv.reshape(-1)]
    weekday = ((local // 1440) + 3) % 7  # 1970-01-01 was a Thursday
    hour = (local % 1440) // 60
    return weekday.astype(np.int8), hour.astype(np.int8)
