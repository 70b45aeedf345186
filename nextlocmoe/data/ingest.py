"""Stage 1 of the streaming prepare (docs/DATA.md): read a source in chunks with the readers' own row
parsers (sources.py, csvsource.py), count dropped rows by reason exactly as the in-memory readers do, and
write each chunk's parsed rows as one Parquet part for the engine (data/engine.py). Memory: one chunk.

Part columns: row (int64, file order over all files), keep (bool: passed every row check), user, venue
(int64 or str, as read), then per data set t_min (int64) or the CSV time parts, lat, lon (float64),
weekday, hour, split (int), dur (float64), category (str). File-wide decisions (integer ids, the time unit,
the time origin, the coordinate check) are left to the engine, which sees every row.
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing as mp
import shutil
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nextlocmoe.data.csvsource import CsvSpec, _csv_path, _parse_rows
from nextlocmoe.data.parsing import (
    CsvColumns,
    DataError,
    IrregularCsv,
    iter_csv_columns,
    load_npy,
    numpy_columns,
    parse_int,
    sha256_file,
)
from nextlocmoe.data.sanity import coordinate_counts, merge_units
from nextlocmoe.data.sources import (
    FSQ_TIME_ORIGIN,
    LLMMOB_FILES,
    MAX_DROP_EXAMPLES,
    SPLIT_CODES,
    _apply_reasons,
    _files_in,
    _parse_llmmob_part,
    fsq_chunk,
    fsq_poi,
    note_malformed,
)

log = logging.getLogger(__name__)


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
    exact: bool = False  # CSV read by the exact (Python csv) reader

    @property
    def acct(self) -> tuple:
        return self.dropped, self.drop_examples, self.drop_first


def write_part(
    file: Path, cols: dict[str, np.ndarray], rows: np.ndarray, keep: np.ndarray | None = None
) -> None:
    """One Parquet part: row numbers [n] (file order), keep [n] (all True when None), the columns [n]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keep = np.ones(len(rows), dtype=bool) if keep is None else keep
    data = {"row": np.asarray(rows, dtype=np.int64), "keep": keep}
    table = pa.table(data | {k: np.ascontiguousarray(v) for k, v in cols.items()})
    pq.write_table(table, file, compression="snappy")


class PartWriter:
    """Writes chunks of columns as parts/part-NNNNNN.parquet, numbering rows in write order."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.parts, self.rows = folder, 0, 0
        folder.mkdir(parents=True, exist_ok=True)

    def next_file(self) -> Path:
        self.parts += 1
        return self.folder / f"part-{self.parts - 1:06d}.parquet"

    def write(self, cols: dict[str, np.ndarray], keep: np.ndarray | None = None) -> None:
        n = len(next(iter(cols.values())))
        write_part(self.next_file(), cols, np.arange(self.rows, self.rows + n), keep)
        self.rows += n


@dataclass
class PartResult:
    """What a worker reports for one chunk: its row accounting, merged in file order by `merge`."""

    name: str  # the file read
    n_rows: int
    sha: str
    acct: tuple  # (dropped Counter, examples, first) of this chunk
    columns: list[str]
    units_seen: dict = field(default_factory=dict)
    coord_counts: np.ndarray | None = None


def merge(ing: Ingested, r: PartResult) -> None:
    """Add one chunk's accounting to ``ing`` as the serial readers would have counted it."""
    ing.input_rows += r.n_rows
    ing.dropped.update(r.acct[0])
    for reason, rows in r.acct[1].items():
        have = ing.drop_examples.setdefault(reason, [])
        have.extend(rows[: max(0, MAX_DROP_EXAMPLES - len(have))])
    for reason, text in r.acct[2].items():
        ing.drop_first.setdefault(reason, text)
    merge_units(ing.units_seen, r.units_seen)
    if r.coord_counts is not None:
        ing.coord_counts = r.coord_counts if ing.coord_counts is None else ing.coord_counts + r.coord_counts
    ing.columns = set(r.columns)
    if r.sha:
        ing.source_sha256[r.name] = r.sha


Runner = Callable[[Callable, Iterator[tuple]], Iterator]  # (fn, jobs) -> fn(*job) in job order
POOL_MIN_ROWS = 200_000  # a first chunk smaller than this: the source is small, parse it inline


def run_ordered(fn, jobs: Iterator[tuple], workers: int) -> Iterator:
    """``fn(*job)`` for each job (its first item a chunk), in ``workers`` processes, results in job order;
    at most ``workers`` + 1 jobs in flight, so memory holds that many chunks. Inline (no process start-up)
    for one worker, one job or a small first chunk."""
    jobs = iter(jobs)
    first = next(jobs, None)
    second = next(jobs, None) if first is not None else None
    if second is None or workers <= 1 or first[0].n_rows < POOL_MIN_ROWS:
        for job in [j for j in (first, second) if j is not None]:
            yield fn(*job)
        for job in jobs:
            yield fn(*job)
        return
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        pending: deque = deque()
        for job in itertools.chain([first, second], jobs):
            pending.append(ex.submit(fn, *job))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def ingest(
    dataset: str,
    source: Path,
    spec: CsvSpec | None,
    parts: Path,
    chunk_rows: int,
    workers: int = 1,
    runner: Runner | None = None,
) -> Ingested:
    """Read ``source`` of ``dataset`` in chunks of ``chunk_rows`` rows into Parquet parts under ``parts``:
    with the fast CSV reader, and again with the exact one when a file is irregular (parsing.py). The
    chunks are parsed by ``runner(fn, jobs)`` (results in job order): by default `run_ordered` in
    ``workers`` processes; the Spark prepare passes Spark tasks (data/spark_engine.py)."""
    run = runner or functools.partial(run_ordered, workers=workers)
    try:
        return _ingest(dataset, source, spec, parts, chunk_rows, run, exact=False)
    except IrregularCsv as e:
        log.info("%s: irregular CSV (%s): reading it again with the exact reader", source, str(e)[:200])
        shutil.rmtree(parts, ignore_errors=True)
        return _ingest(dataset, source, spec, parts, chunk_rows, run, exact=True)


def _ingest(
    dataset: str, source: Path, spec: CsvSpec | None, parts: Path, chunk_rows: int, run: Runner, exact: bool
) -> Ingested:
    ing = Ingested(dataset, parts, exact=exact)
    w = PartWriter(parts)
    if dataset == "fsq-nyc":
        _ingest_fsq(Path(source), w, chunk_rows, run, ing)
    elif dataset in LLMMOB_FILES:
        _ingest_llmmob(Path(source), w, chunk_rows, run, ing)
    elif dataset == "csv":
        _ingest_csv(Path(source), spec or CsvSpec(), w, chunk_rows, run, ing)
    else:
        raise DataError(f"unknown dataset {dataset!r}")
    return ing


@dataclass
class NpySlice:
    """Rows start..start + n_rows of an fsq-nyc NYC.npy (read by the worker, memory-mapped)."""

    path: Path
    poi_path: Path
    start: int
    n_rows: int


def _ingest_fsq(source: Path, w: PartWriter, chunk_rows: int, run: Runner, ing: Ingested) -> None:
    checkins_path, poi_path = _files_in(source, ["NYC.npy", "NYC_POI.npy"])
    arr = load_npy(checkins_path, 3, "iu", "int rows [user_id, venue_id, t_minutes]", mmap=True)
    n = len(arr)
    jobs = ((NpySlice(checkins_path, poi_path, s, min(chunk_rows, n - s)), w.next_file())
            for s in range(0, max(n, 1), chunk_rows))  # fmt: skip
    for r in run(fsq_part, jobs):
        merge(ing, r)
    ing.source_sha256 = {p.name: sha256_file(p) for p in (checkins_path, poi_path)}
    ing.time_origin = FSQ_TIME_ORIGIN
    ing.columns = {"user", "venue", "t_min", "lat", "lon", "weekday", "hour"}


def fsq_part(s: NpySlice, file: Path) -> PartResult:
    """Worker: rows of NYC.npy -> the kept rows as a part, numbered start + k (file order; the engine only
    orders by the number)."""
    arr = load_npy(s.path, 3, "iu", "int rows [user_id, venue_id, t_minutes]", mmap=True)
    chunk = np.asarray(arr[s.start : s.start + s.n_rows], dtype=np.int64)
    acct: tuple = (Counter(), {}, {})
    cols = fsq_chunk(chunk, s.start, fsq_poi(s.poi_path), s.path.name, acct)
    write_part(file, cols, s.start + np.arange(len(cols["t_min"])))
    return PartResult(s.path.name, s.n_rows, "", acct, list(cols))


def _ingest_llmmob(source: Path, w: PartWriter, chunk_rows: int, run: Runner, ing: Ingested) -> None:
    prefix, extra_cols = LLMMOB_FILES[ing.dataset]
    paths = _files_in(source, [f"{prefix}_{s}.csv" for s in SPLIT_CODES])
    required = ["user_id", "location_id", "start_day", "start_min", "weekday"] + extra_cols

    def jobs():
        for path, code in zip(paths, SPLIT_CODES.values(), strict=True):
            for c in iter_csv_columns(path, required, chunk_rows=chunk_rows, exact=ing.exact, arrow=True):
                yield c, ing.dataset, code, w.next_file(), w.rows
                w.rows += c.n_rows

    for r in run(llmmob_part, jobs()):
        merge(ing, r)
    origin = "start_day 0, 00:00 of the LLM-Mob preprocessing (calendar date not published)"
    ing.time_origin = (
        f"t_min = start_day * 1440 + start_min, minutes since {origin}; weekday from the file's "
        "weekday column, hour = start_min // 60 (local time of the source)"
    )
    ing.coordinate_units = "normalised" if ing.dataset == "llmmob-fsq-nyc" else "none"


def llmmob_part(c: CsvColumns, dataset: str, code: int, file: Path, row0: int) -> PartResult:
    """Worker: one chunk of an LLM-Mob CSV -> its kept rows as a part (rows numbered from row0)."""
    c = numpy_columns(c)
    acct: tuple = (Counter(), {}, {})
    note_malformed(c, *acct)
    where = (f"{c.path.name}:", c.lines)
    part, keep = _parse_llmmob_part(c.cols, dataset, acct[0], acct[1], where, acct[2], with_keep=True)
    part["split"] = np.full(len(part["t_min"]), code, dtype=np.int8)
    if dataset == "llmmob-geolife":
        part["lat"] = part["lon"] = np.full(len(part["t_min"]), np.nan)
    write_part(file, part, row0 + np.flatnonzero(keep))
    return PartResult(c.path.name, c.n_rows, c.sha256, acct, list(part))


def _ingest_csv(
    source: Path, spec: CsvSpec, w: PartWriter, chunk_rows: int, run: Runner, ing: Ingested
) -> None:
    spec.check()
    path = _csv_path(source)
    ing.path, ing.spec = path, spec

    def jobs():
        for c in iter_csv_columns(path, spec.columns(), chunk_rows=chunk_rows, exact=ing.exact, arrow=True):
            yield c, spec, w.next_file(), w.rows
            w.rows += len(c.lines)

    for r in run(csv_part, jobs()):
        merge(ing, r)
    ing.coordinate_units = "degrees" if spec.lat_col else "none"


def csv_part(c: CsvColumns, spec: CsvSpec, file: Path, row0: int) -> PartResult:
    """Worker: one chunk of a check-in CSV -> all its rows as a part (keep: passed the row checks)."""
    c = numpy_columns(c)
    acct: tuple = (Counter(), {}, {})
    note_malformed(c, *acct)
    v, reasons = _parse_rows(spec, c.cols, c.path)
    keep = _apply_reasons(reasons, acct[0], len(v["user"]), acct[1], (f"{c.path.name}:", c.lines), acct[2])
    cols = {k: v[k] for k in ("user", "venue", "lat", "lon")}
    res = PartResult(c.path.name, c.n_rows, c.sha256, acct, [])
    if spec.time_col:
        res.units_seen = v["units_seen"]
        cols.update(tnum=v["tnum"], tnum_ok=v["tnum_ok"], tiso=v["tiso"])
    else:
        cols.update(weekday=v["wd"], hour=v["hr"])
        if spec.order_col:
            cols["ord"] = c.cols[spec.order_col]
            cols["ord_ok"] = parse_int(cols["ord"])[1]
    if spec.lat_col:
        res.coord_counts = coordinate_counts(v["lat"], v["lon"])
    if spec.duration_col:
        cols["dur"] = v["dur"]
    if spec.category_col:
        cols["category"] = c.cols[spec.category_col]
    write_part(file, cols, row0 + np.arange(len(c.lines)), keep)
    res.columns = list(cols)
    return res
