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
        return n


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


def parse_times(values: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, str]:
    """[R] str time values -> (minutes since 1970 [R] float64, ok [R] bool, the unit found). Numbers are
    unix time in the one unit that makes them dates of 1973-2128 (numbers in no such range count as
    seconds); text is ISO-8601. Refuses a mix of units with counts and an example of each (``where`` names
    file and column)."""
    from nextlocmoe.data.parsing import _iso_minutes, parse_float

    secs, numeric = parse_float(values)
    minutes = np.full(len(values), np.nan)
    iso = np.zeros(len(values), dtype=bool)
    for i in np.flatnonzero(~numeric):
        try:
            minutes[i], iso[i] = _iso_minutes(str(values[i])), True
        except ValueError:
            pass
    mag = np.abs(secs)
    found = {name: numeric & (mag / div >= 1e8) & (mag / div < 5e9) for name, div in UNITS}
    found = {k: m for k, m in found.items() if m.any()}
    if iso.any():
        found["ISO-8601 text"] = iso
    if len(found) > 1:
        parts = [f"{k}: {int(m.sum())} rows, e.g. {values[np.flatnonzero(m)[0]]!r}" for k, m in found.items()]
        raise DataError(f"{where}: time values in more than one unit ({'; '.join(parts)}); use one unit")
    unit = next(iter(found), "unix seconds")
    div = dict(UNITS).get(unit, 1.0)
    minutes[numeric] = secs[numeric] / div / 60.0
    return minutes, numeric | iso, unit


def check_coordinates(lat: np.ndarray, lon: np.ndarray, where: str, force: bool) -> None:
    """Refuse coordinates that look projected or swapped (module docstring), unless ``force``."""
    ok = np.isfinite(lat) & np.isfinite(lon)
    if force or ok.sum() < 10:
        return
    la, lo = lat[ok], lon[ok]
    medians = f"median latitude {np.median(la):.4g}, longitude {np.median(lo):.4g}"
    hint = "; --force-coordinates keeps them as given"
    if np.mean((np.abs(la) > 90) | (np.abs(lo) > 180)) > 0.5:
        if (
            np.mean(np.abs(lo) <= 90) > 0.5
            and np.mean(np.abs(la) <= 180) > 0.5
            and np.mean(np.abs(la) > 90) > 0.5
        ):
            raise DataError(f"{where}: latitude and longitude look swapped (latitude beyond +-90 in most "
                            f"rows; {medians}): swap the --lat-col and --lon-col names{hint}")  # fmt: skip
        raise DataError(f"{where}: coordinates outside degree ranges in most rows ({medians}): projected "
                        f"(metres?) coordinates are not supported, give WGS84 degrees{hint}")  # fmt: skip
    if np.mean(la < -60) > 0.9:
        raise DataError(
            f"{where}: {np.mean(la < -60):.0%} of the points lie in Antarctica ({medians}): "
            f"latitude and longitude look swapped: swap --lat-col and --lon-col{hint}"
        )
