"""Stage 1 of the streaming prepare (docs/DATA.md): read a source in chunks with the readers' own row
parsers (sources.py, csvsource.py), count dropped rows by reason exactly as the in-memory readers do, and
write each chunk's parsed rows as one Parquet part for the engine (data/engine.py). Memory: one chunk.

Part columns: row (int64, file order over all files), keep (bool: passed every row check), user, venue
(int64 or str, as read), then per data set t_min (int64) or the CSV time parts, lat, lon (float64),
weekday, hour, split (int), dur (float64), category (str). File-wide decisions (integer ids, the time unit,
the time origin, the coordinate check) are left to the engine, which sees every row.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nextlocmoe.data.csvsource import CsvSpec, _csv_path, _parse_rows
from nextlocmoe.data.parsing import DataError, iter_csv_columns, load_npy, parse_int, sha256_file
from nextlocmoe.data.sanity import coordinate_counts, merge_units
from nextlocmoe.data.sources import (
    FSQ_TIME_ORIGIN,
    LLMMOB_FILES,
    SPLIT_CODES,
    _apply_reasons,
    _files_in,
    _parse_llmmob_part,
    fsq_chunk,
    fsq_poi,
    note_malformed,
)


@dataclass
class Ingested:
    """What stage 1 read: the Parquet parts and the row accounting (as a RecordTable's)."""

    dataset: str
    parts: Path
    input_rows: int = 0
    dropped: Counter = field(default_factory=Counter)
    drop_examples: dict[str, list[str]] = field(default_factory=dict)
    drop_first: dict[str, str] = field(default_factory=dict)
    source_sha256: dict[str, str] = field(default_factory=dict)
    time_origin: str = ""
    coordinate_units: str = "degrees"
    columns: set[str] = field(default_factory=set)
    units_seen: dict[str, list] = field(default_factory=dict)  # csv time column: unit -> [rows, example]
    coord_counts: np.ndarray | None = None  # csv lat/lon: sanity.coordinate_counts summed
    unit: str = ""  # csv time column: the unit decided over the whole file (engine.check_rows)
    path: Path | None = None  # csv: the file read
    spec: CsvSpec | None = None
    extra: dict = field(default_factory=dict)

    @property
    def acct(self) -> tuple:
        return self.dropped, self.drop_examples, self.drop_first


class PartWriter:
    """Writes chunks of columns as parts/part-NNNNNN.parquet, numbering rows in write order."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.parts, self.rows = folder, 0, 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, cols: dict[str, np.ndarray], keep: np.ndarray | None = None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = len(next(iter(cols.values())))
        keep = np.ones(n, dtype=bool) if keep is None else keep
        data = {"row": np.arange(self.rows, self.rows + n, dtype=np.int64), "keep": keep}
        table = pa.table(data | {k: np.ascontiguousarray(v) for k, v in cols.items()})
        pq.write_table(table, self.folder / f"part-{self.parts:06d}.parquet", compression="zstd")
        self.parts, self.rows = self.parts + 1, self.rows + n


def ingest(dataset: str, source: Path, spec: CsvSpec | None, parts: Path, chunk_rows: int) -> Ingested:
    """Read ``source`` of ``dataset`` in chunks of ``chunk_rows`` rows into Parquet parts under ``parts``."""
    ing = Ingested(dataset, parts)
    w = PartWriter(parts)
    if dataset == "fsq-nyc":
        _ingest_fsq(Path(source), w, chunk_rows, ing)
    elif dataset in LLMMOB_FILES:
        _ingest_llmmob(Path(source), w, chunk_rows, ing)
    elif dataset == "csv":
        _ingest_csv(Path(source), spec or CsvSpec(), w, chunk_rows, ing)
    else:
        raise DataError(f"unknown dataset {dataset!r}")
    return ing


def _ingest_fsq(source: Path, w: PartWriter, chunk_rows: int, ing: Ingested) -> None:
    checkins_path, poi_path = _files_in(source, ["NYC.npy", "NYC_POI.npy"])
    arr = load_npy(checkins_path, 3, "iu", "int rows [user_id, venue_id, t_minutes]", mmap=True)
    poi = fsq_poi(poi_path)
    for s in range(0, max(len(arr), 1), chunk_rows):
        chunk = np.asarray(arr[s : s + chunk_rows], dtype=np.int64)
        w.write(fsq_chunk(chunk, s, poi, checkins_path.name, ing.acct))
    ing.input_rows = len(arr)
    ing.source_sha256 = {p.name: sha256_file(p) for p in (checkins_path, poi_path)}
    ing.time_origin = FSQ_TIME_ORIGIN
    ing.columns = {"user", "venue", "t_min", "lat", "lon", "weekday", "hour"}


def _ingest_llmmob(source: Path, w: PartWriter, chunk_rows: int, ing: Ingested) -> None:
    prefix, extra_cols = LLMMOB_FILES[ing.dataset]
    paths = _files_in(source, [f"{prefix}_{s}.csv" for s in SPLIT_CODES])
    required = ["user_id", "location_id", "start_day", "start_min", "weekday"] + extra_cols
    for path, code in zip(paths, SPLIT_CODES.values(), strict=True):
        for c in iter_csv_columns(path, required, chunk_rows=chunk_rows):
            ing.input_rows += c.n_rows
            note_malformed(c, *ing.acct)
            part = _parse_llmmob_part(
                c.cols, ing.dataset, *ing.acct[:2], (f"{path.name}:", c.lines), ing.acct[2]
            )
            part["split"] = np.full(len(part["t_min"]), code, dtype=np.int8)
            if ing.dataset == "llmmob-geolife":
                part["lat"] = part["lon"] = np.full(len(part["t_min"]), np.nan)
            w.write(part)
            if c.sha256:
                ing.source_sha256[path.name] = c.sha256
    origin = "start_day 0, 00:00 of the LLM-Mob preprocessing (calendar date not published)"
    ing.time_origin = (
        f"t_min = start_day * 1440 + start_min, minutes since {origin}; weekday from the file's "
        "weekday column, hour = start_min // 60 (local time of the source)"
    )
    ing.coordinate_units = "normalised" if ing.dataset == "llmmob-fsq-nyc" else "none"
    ing.columns = {"user", "venue", "t_min", "lat", "lon", "weekday", "hour", "split"}
    if ing.dataset == "llmmob-geolife":
        ing.columns.add("dur")


def _ingest_csv(source: Path, spec: CsvSpec, w: PartWriter, chunk_rows: int, ing: Ingested) -> None:
    spec.check()
    path = _csv_path(source)
    ing.path, ing.spec = path, spec
    for c in iter_csv_columns(path, spec.columns(), chunk_rows=chunk_rows):
        ing.input_rows += c.n_rows
        note_malformed(c, *ing.acct)
        v, reasons = _parse_rows(spec, c.cols, path)
        n = len(v["user"])
        keep = _apply_reasons(
            reasons, ing.dropped, n, ing.drop_examples, (f"{path.name}:", c.lines), ing.drop_first
        )
        cols = {k: v[k] for k in ("user", "venue", "lat", "lon")}
        if spec.time_col:
            merge_units(ing.units_seen, v["units_seen"])
            cols.update(tnum=v["tnum"], tnum_ok=v["tnum_ok"], tiso=v["tiso"])
        else:
            cols.update(weekday=v["wd"], hour=v["hr"])
            if spec.order_col:
                cols["ord"] = c.cols[spec.order_col]
                cols["ord_ok"] = parse_int(cols["ord"])[1]
        if spec.lat_col:
            counts = coordinate_counts(v["lat"], v["lon"])
            ing.coord_counts = counts if ing.coord_counts is None else ing.coord_counts + counts
        if spec.duration_col:
            cols["dur"] = v["dur"]
        if spec.category_col:
            cols["category"] = c.cols[spec.category_col]
        w.write(cols, keep)
        if c.sha256:
            ing.source_sha256 = {path.name: c.sha256}
    ing.columns = set(cols)
    ing.coordinate_units = "degrees" if spec.lat_col else "none"
