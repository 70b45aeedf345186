"""Input sanity for `prepare --dataset csv` (issue 21): what the file is, and whether its values mean what
the reader assumes, checked before anything is prepared.

- Formats: plain, gzip (``.gz``), zstd (``.zst``) or bzip2 (``.bz2``) CSV, decompressed while read by
  pyarrow's input streams (the field's tool for columnar files; one reader for all codecs), and Parquet
  (``.parquet``/``.pq``) read by pyarrow.parquet. Every format goes through the same row accounting.
- The source hash is of the bytes actually read (hashed while reading), and the file's size and mtime are
  compared before and after: a file still being written is refused instead of half-read.
- Time units of numeric time columns: unix seconds, milliseconds, microseconds or nanoseconds, detected from
  the magnitude of each value (a plausible date, 1973-2128, in exactly one unit); ISO-8601 text is its own
  unit. A column mixing units (e.g. seconds and milliseconds, or numbers and ISO text) is refused; the unit
  found is stated in the prepare summary (the manifest's time origin).
- Coordinates: a column set that looks projected (most values outside degree ranges) or swapped (latitude
  outside +-90 while longitude is inside, or nearly every point in Antarctica, which has no check-ins) is
  refused with the reason; ``--force-coordinates`` keeps them as given.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from nextlocmoe.data.parsing import DataError

COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
PARQUET = (".parquet", ".pq")
# magnitude of |t| for a date in 1973..2128 (1e8 .. 5e9 s), per unit: seconds -> divisor to seconds
UNITS = (
    ("unix seconds", 1.0),
    ("unix milliseconds", 1e3),
    ("unix microseconds", 1e6),
    ("unix nanoseconds", 1e9),
)


class HashingReader(io.RawIOBase):
    """A binary stream that hashes (sha256) every byte read through it."""

    def __init__(self, raw) -> None:
        self.raw, self.sha = raw, hashlib.sha256()
        self.newlines, self.last = 0, b""  # line feeds read, and the last byte

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.raw.close()
        super().close()

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        if n:
            self.newlines += data.count(b"\n")
            self.last = data[-1:]
        return n

    def lines(self) -> int:
        """Physical lines read (a last line without a line feed counts)."""
        return self.newlines + (1 if self.last not in (b"", b"\n") else 0)


def file_state(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def check_unchanged(path: Path, before: tuple[int, int]) -> None:
    after = file_state(path)
    if after != before:
        raise DataError(
            f"{path}: the file changed while it was read (size {before[0]} -> {after[0]} bytes, "
            f"mtime changed: {after[1] != before[1]}); prepare a finished copy of it"
        )


def open_binary(path: Path):
    """The file's (decompressed) bytes as a binary stream; pyarrow for compressed files."""
    codec = COMPRESSED.get(path.suffix.lower())
    if codec is None:
        return open(path, "rb")
    import pyarrow as pa

    try:
        return pa.input_stream(str(path), compression=codec)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot open as {codec}-compressed CSV ({e})") from None


def time_values(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, list]]:
    """[R] str time values -> (numbers [R] float64, numeric [R] bool, ISO minutes since 1970 [R] float64
    (NaN where not ISO-8601 text), the units seen: unit -> [rows, first example]). Row-local: chunks of a
    file can be read apart and their units merged (`merge_units`) before `time_unit` decides."""
    from nextlocmoe.data.parsing import _iso_minutes, parse_float

    secs, numeric = parse_float(values)
    iso_min = np.full(len(values), np.nan)
    for i in np.flatnonzero(~numeric):
        try:
            iso_min[i] = _iso_minutes(str(values[i]))
        except ValueError:
            pass
    mag = np.abs(secs)
    found = {name: numeric & (mag / div >= 1e8) & (mag / div < 5e9) for name, div in UNITS}
    found["ISO-8601 text"] = np.isfinite(iso_min)
    seen = {k: [int(m.sum()), values[np.flatnonzero(m)[0]]] for k, m in found.items() if m.any()}
    return secs, numeric, iso_min, seen


def merge_units(total: dict[str, list], seen: dict[str, list]) -> None:
    """Add one chunk's units seen (`time_values`) to ``total`` (counts add, the first example stays)."""
    for k, (n, example) in seen.items():
        if k in total:
            total[k][0] += n
        else:
            total[k] = [n, example]


def time_unit(seen: dict[str, list], where: str) -> str:
    """The one unit of a time column from its units seen; refuses a mix with counts and an example of each
    (``where`` names file and column). Numbers in no plausible range count as unix seconds."""
    order = [name for name, _ in UNITS] + ["ISO-8601 text"]
    seen = {k: seen[k] for k in order if k in seen}
    if len(seen) > 1:
        parts = [f"{k}: {n} rows, e.g. {ex!r}" for k, (n, ex) in seen.items()]
        raise DataError(f"{where}: time values in more than one unit ({'; '.join(parts)}); use one unit")
    return next(iter(seen), "unix seconds")


def unit_minutes(secs: np.ndarray, numeric: np.ndarray, iso_min: np.ndarray, unit: str) -> np.ndarray:
    """Minutes since 1970 [R] float64 from `time_values` parts in the column's unit (NaN: unparsable)."""
    div = dict(UNITS).get(unit, 1.0)
    return np.where(numeric, secs / div / 60.0, iso_min)


def parse_times(values: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, str]:
    """[R] str time values -> (minutes since 1970 [R] float64, ok [R] bool, the unit found). Numbers are
    unix time in the one unit that makes them dates of 1973-2128 (numbers in no such range count as
    seconds); text is ISO-8601. Refuses a mix of units with counts and an example of each (``where`` names
    file and column)."""
    secs, numeric, iso_min, seen = time_values(values)
    unit = time_unit(seen, where)
    return unit_minutes(secs, numeric, iso_min, unit), numeric | np.isfinite(iso_min), unit


def coordinate_counts(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """[6] int64 counts over finite (lat, lon) rows that `judge_coordinates` decides on: rows, beyond
    degree ranges, |lon| <= 90, |lat| <= 180, |lat| > 90, lat < -60. Additive over chunks."""
    ok = np.isfinite(lat) & np.isfinite(lon)
    la, lo = lat[ok], lon[ok]
    beyond = (np.abs(la) > 90) | (np.abs(lo) > 180)
    parts = [ok, beyond, np.abs(lo) <= 90, np.abs(la) <= 180, np.abs(la) > 90, la < -60]
    return np.array([int(p.sum()) for p in parts], dtype=np.int64)


def check_coordinates(lat: np.ndarray, lon: np.ndarray, where: str, force: bool) -> None:
    """Refuse coordinates that look projected or swapped (module docstring), unless ``force``."""
    ok = np.isfinite(lat) & np.isfinite(lon)
    judge_coordinates(
        coordinate_counts(lat, lon), lambda: (np.median(lat[ok]), np.median(lon[ok])), where, force
    )


def judge_coordinates(counts: np.ndarray, medians, where: str, force: bool) -> None:
    """`check_coordinates` from `coordinate_counts` (summed over chunks); ``medians()`` -> (median
    latitude, median longitude) of the finite rows, asked only for the message of a refusal."""
    n, beyond, lo90, la180, la90, south = (int(c) for c in counts)
    if force or n < 10:
        return
    hint = "; --force-coordinates keeps them as given"
    if beyond / n > 0.5:
        m_la, m_lo = medians()
        where_m = f"median latitude {m_la:.4g}, longitude {m_lo:.4g}"
        if lo90 / n > 0.5 and la180 / n > 0.5 and la90 / n > 0.5:
            raise DataError(f"{where}: latitude and longitude look swapped (latitude beyond +-90 in most "
                            f"rows; {where_m}): swap the --lat-col and --lon-col names{hint}")  # fmt: skip
        raise DataError(f"{where}: coordinates outside degree ranges in most rows ({where_m}): projected "
                        f"(metres?) coordinates are not supported, give WGS84 degrees{hint}")  # fmt: skip
    if south / n > 0.9:
        m_la, m_lo = medians()
        raise DataError(
            f"{where}: {south / n:.0%} of the points lie in Antarctica (median latitude {m_la:.4g}, "
            f"longitude {m_lo:.4g}): latitude and longitude look swapped: swap --lat-col and --lon-col{hint}"
        )
