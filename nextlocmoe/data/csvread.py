"""CSV and Parquet readers of `prepare` (and of batch prediction): the requested columns as text, with
the row accounting (data rows, malformed rows and their line numbers) and the hash of the bytes read.
Two CSV readers with one result: pyarrow's for regular files, Python's csv module for the rest
(`iter_csv_columns`)."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nextlocmoe.data.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class CsvColumns:
    """Columns of a CSV file as string arrays (well-formed rows only).

    cols: name -> [R] str array for each requested column present in the header.
    lines: [R] int64 1-based line numbers of those rows in the file.
    n_rows: data rows seen (blank lines are not rows), n_malformed: rows with the wrong column count.
    """

    path: Path
    header: list[str]
    cols: dict[str, np.ndarray]
    lines: np.ndarray
    n_rows: int
    n_malformed: int
    malformed_lines: list[int] = field(default_factory=list)
    sha256: str = ""  # of the bytes actually read (data/sanity.py)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_bad_utf8_line(path: Path) -> str:
    """'line N, byte 0xXX at column C' of the first line of ``path`` that is not valid UTF-8."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {line_no}, byte 0x{raw[e.start]:02x} at column {e.start + 1}"
    return "unknown line"


class IrregularCsv(Exception):
    """The fast CSV reader met something only the exact reader accounts for (a blank or malformed line, a
    quoted line break, bytes that are not UTF-8): the caller starts over with ``exact=True``."""


def read_csv_columns(path: Path, required: list[str], optional: list[str] = ()) -> CsvColumns:
    """Read `required` (+ present `optional`) columns of a headed CSV (or Parquet) whole: the one chunk of
    `iter_csv_columns` with no row limit."""
    try:
        return next(iter_csv_columns(path, required, optional, chunk_rows=0))
    except IrregularCsv:
        return next(iter_csv_columns(path, required, optional, chunk_rows=0, exact=True))


def iter_csv_columns(
    path: Path,
    required: list[str],
    optional: list[str] = (),
    chunk_rows: int = 0,
    exact: bool = False,
    arrow: bool = False,
) -> Iterator[CsvColumns]:
    """The `required` (+ present `optional`) columns of a headed CSV in chunks of about ``chunk_rows``
    rows (0 = one chunk), as str arrays. Each chunk counts its own rows; the last one carries the hash of
    every byte read (and is yielded even when empty). Parquet files go to `iter_parquet_columns`.

    Two readers with one result: the fast one (pyarrow's multithreaded CSV parser) reads regular files,
    where data row k is line k + 2, and raises `IrregularCsv` (possibly after some chunks) on anything
    else; the exact one (``exact=True``, Python's csv module) counts blank lines out and rows with a wrong
    column count as malformed (e.g. a truncated last line), with their line numbers. ``arrow``: the fast
    reader's columns stay Arrow arrays (cheap to send to a worker process; `numpy_columns` converts).
    """
    from nextlocmoe.data import sanity

    path = Path(path)
    if path.suffix.lower() in sanity.PARQUET:
        yield from iter_parquet_columns(path, required, optional, chunk_rows)
    elif exact:
        yield from _iter_csv_exact(path, required, optional, chunk_rows)
    else:
        yield from _iter_csv_fast(path, required, optional, chunk_rows, arrow)


def _header(path: Path, required: list[str], optional: list[str]) -> tuple[list[str], list[str]]:
    """(header names stripped, the wanted ones present); DataError on an empty file, a duplicate name or a
    missing required column; IrregularCsv when the header is not one plain UTF-8 line."""
    from nextlocmoe.data import sanity

    try:
        with io.TextIOWrapper(sanity.open_binary(path), encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if reader.line_num > 1:
                raise IrregularCsv("header over several lines")
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        raise IrregularCsv(str(e)) from None
    return _check_header(path, header, required, optional)


def _check_header(
    path: Path, header: list[str] | None, required: list[str], optional: list[str]
) -> tuple[list[str], list[str]]:
    """(header names stripped, the wanted ones present); DataError on an empty file, a duplicate name or a
    missing required column."""
    if header is None:
        raise DataError(f"{path}: empty file, expected a header line")
    header = [h.strip() for h in header]
    _refuse_duplicates(path, header)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: line 1: header lacks required column(s) {missing}; has {header}")
    return header, [c for c in list(required) + list(optional) if c in header]


def _iter_csv_fast(
    path: Path, required: list[str], optional: list[str], chunk_rows: int, arrow: bool
) -> Iterator[CsvColumns]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from nextlocmoe.data import sanity

    header, wanted = _header(path, required, optional)
    if len(header) < 2:
        raise IrregularCsv("one column: blank lines would be rows")
    before = sanity.file_state(path)
    raw = sanity.HashingReader(sanity.open_binary(path))
    read = pcsv.ReadOptions(
        skip_rows=1, column_names=[f"c{i}" for i in range(len(header))], block_size=1 << 24
    )
    parse = pcsv.ParseOptions(ignore_empty_lines=True, newlines_in_values=False)
    idx = {c: f"c{header.index(c)}" for c in wanted}
    names = list(idx.values())
    conv = pcsv.ConvertOptions(include_columns=names, column_types=dict.fromkeys(names, pa.string()),
                               strings_can_be_null=False, quoted_strings_can_be_null=False)  # fmt: skip
    start, pending, n_pending = 0, [], 0
    try:
        with io.BufferedReader(raw, 1 << 20) as f:
            reader = pcsv.open_csv(f, read_options=read, parse_options=parse, convert_options=conv)
            for batch in reader:
                pending.append(batch)
                n_pending += batch.num_rows
                if chunk_rows and n_pending >= chunk_rows:
                    yield _arrow_chunk(path, header, idx, pending, start, "", arrow)
                    start, pending, n_pending = start + n_pending, [], 0
            f.read()
    except (pa.ArrowInvalid, UnicodeDecodeError, OSError) as e:
        raise IrregularCsv(str(e)) from None
    sanity.check_unchanged(path, before)
    if raw.lines() != 1 + start + n_pending:  # blank lines or line breaks in values: not row k = line k + 2
        raise IrregularCsv(f"{raw.lines()} lines for {start + n_pending} rows")
    yield _arrow_chunk(path, header, idx, pending, start, raw.sha.hexdigest(), arrow)


def _arrow_chunk(
    path: Path, header: list[str], idx: dict[str, str], batches: list, start: int, sha: str, arrow: bool
) -> CsvColumns:
    """Arrow batches of one chunk (data rows start.. of a regular file) -> CsvColumns of str arrays (Arrow
    string arrays with ``arrow``)."""
    import pyarrow as pa

    n = sum(b.num_rows for b in batches)
    cols = {
        c: pa.chunked_array([b.column(name) for b in batches], type=pa.string()) for c, name in idx.items()
    }
    lines = np.arange(start + 2, start + n + 2, dtype=np.int64)
    c = CsvColumns(path, header, cols, lines, n, 0, [], sha)
    return c if arrow else numpy_columns(c)


def numpy_columns(c: CsvColumns) -> CsvColumns:
    """The chunk with its Arrow columns (``arrow`` reads) as numpy str (object) arrays, in place."""
    c.cols = {k: v if isinstance(v, np.ndarray) else v.to_numpy() for k, v in c.cols.items()}
    return c


def _iter_csv_exact(
    path: Path, required: list[str], optional: list[str] = (), chunk_rows: int = 0
) -> Iterator[CsvColumns]:
    """Python's csv module, line by line (see `iter_csv_columns`). Accepts what spreadsheets write: a UTF-8
    byte-order mark, CRLF line ends, quoted fields (with commas, quotes or line breaks inside), spaces around
    header names. Raises DataError naming the file (and line) when the file cannot be read, is not UTF-8, or
    the header lacks a required column."""
    from nextlocmoe.data import sanity

    line_no, first_bad, n_bad = 0, 0, 0
    try:
        before = sanity.file_state(path)
        raw = sanity.HashingReader(sanity.open_binary(path))
        with io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header, wanted = _check_header(path, next(reader, None), required, optional)
            idx = [header.index(c) for c in wanted]
            width = len(header)
            rows: list[list[str]] = []
            lines: list[int] = []
            bad: list[int] = []
            n_rows = 0
            for row in reader:
                line_no = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip() and width > 1):
                    continue
                n_rows += 1
                if len(row) != width:
                    bad.append(reader.line_num)
                    first_bad, n_bad = first_bad or reader.line_num, n_bad + 1
                    continue
                rows.append([row[i] for i in idx])
                lines.append(reader.line_num)
                if len(rows) == chunk_rows:
                    yield _columns(path, header, wanted, rows, lines, n_rows, bad, "")
                    rows, lines, bad, n_rows = [], [], [], 0
            f.read()  # the rest (nothing, normally): the hash covers every byte
        sanity.check_unchanged(path, before)
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: {_first_bad_utf8_line(path)}: not UTF-8 text (re-save the file as UTF-8)"
        ) from None
    except csv.Error as e:
        raise DataError(f"{path}: line {line_no + 1}: cannot parse CSV ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read CSV ({e})") from None
    if n_bad:
        msg = "%s: %d row(s) with a wrong column count (first at line %d): dropped"
        log.warning(msg, path, n_bad, first_bad)
    yield _columns(path, header, wanted, rows, lines, n_rows, bad, raw.sha.hexdigest())


def _columns(path, header, wanted, rows, lines, n_rows, bad, sha) -> CsvColumns:
    """One chunk of rows (lists of str) -> CsvColumns (str arrays per column)."""
    table = np.array(rows, dtype=str).reshape(len(rows), len(wanted))
    cols = {c: table[:, j] for j, c in enumerate(wanted)}
    lines_a = np.asarray(lines, dtype=np.int64)
    return CsvColumns(path, header, cols, lines_a, n_rows, len(bad), bad[:20], sha)


def _refuse_duplicates(path: Path, header: list[str]) -> None:
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        where = {h: [i + 1 for i, x in enumerate(header) if x == h] for h in dup}
        raise DataError(f"{path}: line 1: duplicate column name(s) {where} (name: column positions); "
                        "rename them so that each column is read unambiguously")  # fmt: skip


def iter_parquet_columns(
    path: Path, required: list[str], optional: list[str] = (), chunk_rows: int = 0
) -> Iterator[CsvColumns]:
    """The columns of a Parquet file as strings (pyarrow), in chunks of ``chunk_rows`` rows (0 = one), with
    the CSV reader's accounting: "line" k+1 is row k (the header is line 1); the hash (on the last chunk) is
    of the file's bytes, checked unchanged after the read."""
    import pyarrow.parquet as pq

    from nextlocmoe.data import sanity

    before = sanity.file_state(path)
    try:
        pf = pq.ParquetFile(path)
        header = list(pf.schema_arrow.names)
        _refuse_duplicates(path, header)
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{path}: header lacks required column(s) {missing}; has {header}")
        wanted = [c for c in list(required) + list(optional) if c in header]
        n_total = pf.metadata.num_rows
        batches = pf.iter_batches(batch_size=chunk_rows or max(n_total, 1), columns=wanted)
        start = 0
        for batch in batches:
            n = batch.num_rows
            if start + n == n_total:
                break
            yield _parquet_chunk(path, header, wanted, batch, start)
            start += n
        else:
            batch = None
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read Parquet ({str(e).splitlines()[0]})") from None
    sha = sha256_file(path)
    sanity.check_unchanged(path, before)
    last = _parquet_chunk(path, header, wanted, batch, start)
    last.sha256 = sha
    yield last


def _parquet_chunk(path: Path, header: list[str], wanted: list[str], batch, start: int) -> CsvColumns:
    """A pyarrow RecordBatch (None = no rows) -> CsvColumns of str arrays, lines start+2 ... ."""
    n = 0 if batch is None else batch.num_rows
    cols = {c: np.array([("" if v is None else str(v)) for v in batch.column(c).to_pylist()] if n else [],
                        dtype=str) for c in wanted}  # fmt: skip
    return CsvColumns(path, header, cols, np.arange(start + 2, start + n + 2, dtype=np.int64), n, 0, [], "")
