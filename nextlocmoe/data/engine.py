"""Stage 2 of the streaming prepare (docs/DATA.md): the file-wide steps on DuckDB, out of core under a
memory limit and on all cores. Over the Parquet parts of stage 1 (data/ingest.py) it decides what needs
every row (integer ids, the CSV time unit and origin, the coordinate check), drops duplicates and too-short
users, numbers users and locations densely (sorted ids), picks each location's most frequent coordinate and
category, and hands back the kept records sorted by (user, time, file order) as a stream of Arrow batches.

Every rule is the in-memory reference's (windows.build, the readers); the identity tests
(tests/unit/test_prepare_stream.py) hold the two to the same store.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nextlocmoe.data.csvsource import _from_weekday_hour
from nextlocmoe.data.ingest import Ingested, PartWriter
from nextlocmoe.data.parsing import DataError
from nextlocmoe.data.sanity import UNITS, judge_coordinates, time_unit
from nextlocmoe.data.sources import first_drop_line

_INT_ID = r"[+-]?[0-9]+(\.0*)?"  # parsing._INT_ID


@dataclass
class Staged:
    """The engine's view of the kept records (table ``f``) and the file-wide results."""

    records: int
    users: np.ndarray  # [U] original ids, sorted
    locations: dict[str, np.ndarray]  # id, lat, lon, category (or None), count
    columns: list[str]  # of the sorted stream
    time_origin: str
    dropped: dict[str, int] = field(default_factory=dict)


def connect(work: Path, memory_gb: float, threads: int):
    """A DuckDB database file under ``work`` limited to ``memory_gb`` (it spills to ``work/spill``)."""
    import duckdb

    con = duckdb.connect(str(work / "prepare.duckdb"))
    con.execute(f"SET memory_limit = '{memory_gb:.3f}GB'")
    con.execute(f"SET threads = {int(threads)}")
    con.execute(f"SET temp_directory = '{work / 'spill'}'")
    con.execute("SET preserve_insertion_order = false")
    return con


def _one(con, sql: str):
    """The first row of a query's result."""
    return con.sql(sql).fetchall()[0]


def check_rows(con, ing: Ingested, source: Path) -> None:
    """CSV file-wide checks in the reader's order (time unit, coordinates), then 'no usable rows'."""
    parts = f"read_parquet('{ing.parts}/*.parquet')"
    con.execute(f"CREATE VIEW src AS SELECT * FROM {parts} WHERE keep")
    spec = ing.spec
    if spec is not None and spec.time_col:
        ing.unit = time_unit(ing.units_seen, f"{ing.path}: column {spec.time_col}")
    if spec is not None and spec.lat_col and ing.coord_counts is not None:
        fin = "isfinite(lat) AND isfinite(lon)"
        judge_coordinates(ing.coord_counts, lambda: _one(con, f"SELECT median(lat), median(lon) FROM {parts} "
                          f"WHERE {fin}"), f"{ing.path}: columns {spec.lat_col}/{spec.lon_col}",
                          spec.force_coordinates)  # fmt: skip
    if _one(con, "SELECT count(*) FROM src")[0] == 0:
        where = ing.path if ing.path is not None else source
        raise DataError(f"{where}: no usable rows of {ing.input_rows}: "
                        f"{first_drop_line(ing.dropped, ing.drop_first)}")  # fmt: skip


def id_expr(con, col: str) -> str:
    """SQL for the ids of ``col``: as BIGINT when every distinct one is an integer and stays distinct
    (parsing.ids_as_int_if_all), else as read."""
    kind = _one(con, f"SELECT typeof({col}) FROM src LIMIT 1")[0]
    if kind != "VARCHAR":
        return col
    cast = (
        "CASE WHEN contains({x}, '.') THEN CAST(CAST({x} AS DOUBLE) AS BIGINT) ELSE CAST({x} AS BIGINT) END"
    )
    ok = f"regexp_full_match(x, '{_INT_ID}') AND length(ltrim(split_part(x, '.', 1), '+-')) <= 18"
    n, all_int = _one(con, f"SELECT count(*), bool_and({ok}) FROM (SELECT DISTINCT {col} AS x FROM src)")
    if not all_int:
        return col
    as_int = cast.format(x="x")
    distinct = _one(con, f"SELECT count(DISTINCT {as_int}) FROM (SELECT DISTINCT {col} AS x FROM src)")[0]
    return cast.format(x=col) if distinct == n else col


def time_expr(con, ing: Ingested, work: Path, batch_rows: int) -> tuple[str, str]:
    """SQL for t_min and the time-origin text: as read, from CSV timestamps in the file's unit (minutes
    since the first day's midnight), or reconstructed per user from weekday/hour (csvsource)."""
    spec = ing.spec
    if spec is None:
        return "t_min", ing.time_origin
    if spec.time_col:
        div = dict(UNITS).get(ing.unit, 1.0)
        minutes = (
            f"(CASE WHEN tnum_ok THEN tnum / CAST({div!r} AS DOUBLE) / CAST(60 AS DOUBLE) ELSE tiso END)"
        )
        con.execute(f"CREATE VIEW src_t AS SELECT *, {minutes} AS minutes FROM src")
        origin_min = _one(con, "SELECT floor(min(minutes) / CAST(1440 AS DOUBLE)) * 1440 FROM src_t")[0]
        ing.columns.add("minutes")
        return f"CAST(floor(minutes - CAST({origin_min!r} AS DOUBLE)) AS BIGINT)", origin_text(
            ing, origin_min
        )
    return "t_min", _weekday_hour_times(con, ing, work, batch_rows)


def origin_text(ing: Ingested, origin_min: float) -> str:
    """The manifest's time_origin for CSV timestamps whose first day starts at ``origin_min`` (minutes
    since 1970)."""
    spec = ing.spec
    day = np.datetime64(int(origin_min), "m").astype("datetime64[D]")
    clock = "UTC (unix seconds, offset-aware ISO converted; naive ISO taken as written)"
    tz = spec.timezone
    where = f"weekday/hour in {tz} (DST-aware)" if tz else "weekday/hour from that same clock"
    return (
        f"time column {spec.time_col!r} read as {ing.unit}; t_min = minutes since {day}T00:00 {clock}; "
        + where
    )


def _weekday_hour_times(con, ing: Ingested, work: Path, batch_rows: int) -> str:
    """Per-user reconstructed times (csvsource._from_weekday_hour on whole users) into view src_t."""
    has_order = bool(ing.spec.order_col)
    numeric = bool(_one(con, "SELECT bool_and(ord_ok) FROM src")[0]) if has_order else None
    cols = "row, user, weekday, hour" + (", ord" if has_order else "")
    w = PartWriter(work / "times")
    text = ""
    for b in whole_user_batches(_ordered(con, cols, batch_rows), "user", batch_rows):
        order = b["ord"].astype(str) if has_order else None
        t, text = _from_weekday_hour(b["user"], b["weekday"], b["hour"], order, numeric)
        w.write({"src_row": b["row"], "t_min": t})
    times = f"read_parquet('{work / 'times'}/*.parquet')"
    con.execute(f"CREATE VIEW src_t AS SELECT src.*, t.t_min FROM src JOIN {times} t ON src.row = t.src_row")
    return text


def _ordered(con, cols: str, batch_rows: int):
    return con.sql(f"SELECT {cols} FROM src ORDER BY user, row").to_arrow_reader(batch_rows)


def whole_user_batches(reader: Iterable, key: str, min_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches (column name -> [n] numpy) of Arrow record batches sorted by ``key`` (a query's reader, or
    Parquet files read in order): each the shortest run of whole groups of ``key`` with at least
    ``min_rows`` rows (the last: what is left). The cuts depend on the rows only, not on how the reader
    batches them, so every engine cuts the same shards."""
    i = max(1, int(min_rows))
    carry: dict[str, np.ndarray] | None = None
    for rb in reader:
        cols = {n: rb.column(j).to_numpy(zero_copy_only=False) for j, n in enumerate(rb.schema.names)}
        carry = cols if carry is None else {n: np.concatenate([carry[n], cols[n]]) for n in cols}
        while len(carry[key]) > i:
            k = carry[key]
            later = np.flatnonzero(k[i:] != k[i - 1 : -1])  # group starts at or after row i
            if not len(later):
                break
            cut = i + int(later[0])
            yield {n: v[:cut] for n, v in carry.items()}
            carry = {n: v[cut:] for n, v in carry.items()}
    if carry is not None and len(carry[key]):
        yield carry


def _dbl(x: float) -> str:
    """A float as an exact DuckDB DOUBLE literal (parsed from its shortest repr, correctly rounded)."""
    return f"CAST('{float(x)!r}' AS DOUBLE)"


def create_records(con, ing: Ingested, user: str, venue: str, t_min: str, affine=None) -> None:
    """View r: the kept rows with typed ids and t_min (the reader's RecordTable, over the parts). ``affine``
    = (scale, offset): lat, lon <- lat * scale[0] + offset[0], lon * scale[1] + offset[1] (recovery.py)."""
    src = "src_t" if _has_view(con, "src_t") else "src"
    extra = [c for c in ("weekday", "hour", "dur", "category", "split", "minutes") if c in ing.columns]
    cols = ", ".join(extra)
    lat, lon = "lat", "lon"
    if affine is not None:
        (s0, s1), (o0, o1) = affine
        lat, lon = f"lat * {_dbl(s0)} + {_dbl(o0)}", f"lon * {_dbl(s1)} + {_dbl(o1)}"
    con.execute(f"CREATE OR REPLACE VIEW r AS SELECT row, {user} AS u, {venue} AS v, {t_min} AS t_min, "
                f"{lat} AS lat, {lon} AS lon{', ' + cols if cols else ''} FROM {src}")  # fmt: skip


def _has_view(con, name: str) -> bool:
    return bool(_one(con, f"SELECT count(*) FROM duckdb_views() WHERE view_name = '{name}'")[0])


def distinct_coordinates(con) -> np.ndarray:
    """[P, 2] distinct (lat, lon) pairs of view r, sorted (np.unique(..., axis=0))."""
    d = con.sql("SELECT DISTINCT lat, lon FROM r ORDER BY lat, lon").fetchnumpy()
    return np.stack([d["lat"], d["lon"]], axis=1)


def check_users(con, need: int, source: Path) -> int:
    """Count duplicate (user, venue, t_min) rows (the first in file order stays; table firsts) and each
    user's distinct records (table uc); raises when no user has ``need``. Returns the duplicates."""
    con.execute("CREATE TABLE firsts AS SELECT min(row) AS row FROM r GROUP BY u, v, t_min")
    con.execute("CREATE TABLE uc AS SELECT u, count(*) AS n FROM r SEMI JOIN firsts USING (row) GROUP BY u")
    n_rows = _one(con, "SELECT count(*) FROM r")[0]
    n_dup = n_rows - _one(con, "SELECT count(*) FROM firsts")[0]
    top_u, top_n = _one(con, "SELECT u, n FROM uc ORDER BY n DESC, u LIMIT 1")
    if top_n < need:
        raise no_usable_users(
            source, n_rows, n_dup, need, top_u, top_n, _one(con, "SELECT count(*) FROM uc")[0]
        )
    return int(n_dup)


def no_usable_users(
    source: Path, n_rows: int, n_dup: int, need: int, top_u, top_n, n_users: int
) -> DataError:
    """The error of ``check_users`` (either engine) when no user has ``need`` distinct records."""
    return DataError(
        f"{source}: no usable users: all {n_rows} usable rows would be dropped as user_too_short"
        + (f" or duplicate ({n_dup} duplicates)" if n_dup else "")
        + f": every user has fewer than {need} distinct records (--current + 1 + --min-history); the "
        f"most is user {top_u!r} with {int(top_n)} (of {n_users} users)"
    )


def drop_and_number(con, need: int) -> int:
    """Drop duplicates and users with fewer than ``need`` records (after `check_users`); number users and
    locations by sorted id. Tables users(u, ucode), locs(v, loc), f0 (the kept records with their user
    codes) and view f (with their location codes too). Returns the rows dropped as user_too_short."""
    short = _one(con, f"SELECT coalesce(sum(n), 0) FROM uc WHERE n < {int(need)}")[0]
    code = "CAST(row_number() OVER (ORDER BY u) - 1 AS INTEGER)"
    con.execute(f"CREATE TABLE users AS SELECT u, {code} AS ucode FROM uc WHERE n >= {int(need)}")
    con.execute("CREATE TABLE f0 AS SELECT r.*, users.ucode FROM r JOIN firsts USING (row) "
                "JOIN users USING (u)")  # fmt: skip
    con.execute("CREATE TABLE locs AS SELECT v, CAST(row_number() OVER (ORDER BY v) - 1 AS INTEGER) AS loc "
                "FROM (SELECT DISTINCT v FROM f0)")  # fmt: skip
    con.execute("CREATE VIEW f AS SELECT f0.*, locs.loc FROM f0 JOIN locs USING (v)")
    con.execute("DROP TABLE firsts")
    return int(short)


def _ids(con, table: str, col: str, code: str) -> np.ndarray:
    vals = [x[0] for x in con.sql(f"SELECT {col} FROM {table} ORDER BY {code}").fetchall()]
    if vals and isinstance(vals[0], str):
        return np.array(vals, dtype=str)
    return np.array(vals, dtype=np.int64)


def _mode(con, n: int, cols: list[str], where: str) -> dict[str, list]:
    """Per location code 0..n-1 the most frequent tuple of ``cols`` among f's rows passing ``where``
    (ties: the smallest tuple; windows._mode_per_group); None where a location has no such row."""
    keys = ", ".join(cols)
    rows = con.execute(
        f"SELECT loc, {keys} FROM (SELECT loc, {keys}, count(*) AS c FROM f WHERE {where} GROUP BY ALL) "
        f"QUALIFY row_number() OVER (PARTITION BY loc ORDER BY c DESC, {keys}) = 1"
    ).fetchall()
    out: dict[str, list] = {c: [None] * n for c in cols}
    for r in rows:
        for j, c in enumerate(cols):
            out[c][r[0]] = r[j + 1]
    return out


def users_and_locations(con, has_category: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """User ids [U] and the location table (id, lat, lon, category or None, count [L]) of table f: each
    location's most frequent finite (lat, lon) and most frequent non-empty category."""
    users = _ids(con, "users", "u", "ucode")
    ids = _ids(con, "locs", "v", "loc")
    n = len(ids)
    xy = _mode(con, n, ["lat", "lon"], "isfinite(lat) AND isfinite(lon)")
    lat = np.array([np.nan if v is None else v for v in xy["lat"]], dtype=np.float64)
    lon = np.array([np.nan if v is None else v for v in xy["lon"]], dtype=np.float64)
    count = np.zeros(n, dtype=np.int64)
    for loc, c in con.sql("SELECT loc, count(*) FROM f GROUP BY loc").fetchall():
        count[loc] = c
    category = None
    if has_category:
        cat = _mode(con, n, ["category"], "length(category) > 0")["category"]
        category = np.array(["" if v is None else v for v in cat], dtype=object).astype(str)
    return users, {"id": ids, "lat": lat, "lon": lon, "category": category, "count": count}


def sorted_records(con, columns: list[str]):
    """The kept records, sorted by (user, time, file order), as a DuckDB relation of ``columns``."""
    return con.sql(f"SELECT {', '.join(columns)} FROM f ORDER BY ucode, t_min, row")


def record_count(con) -> int:
    """The kept records (table f0)."""
    return int(_one(con, "SELECT count(*) FROM f0")[0])


def sorted_batches(con, columns: list[str], min_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The kept records sorted by (user, time, file order) in batches of whole users (whole_user_batches)."""
    return whole_user_batches(sorted_records(con, columns).to_arrow_reader(min_rows), "ucode", min_rows)


def runner(con):
    """Stage 1's runner: None, the default worker processes (ingest.run_ordered)."""
    return None
