"""The streaming prepare's stages 1-2 on Apache Spark (`prepare --engine spark`, docs/DATA.md): the same
steps as engine.py (DuckDB), one function for one function, so stream.prepare_stream runs either.

Stage 1: the chunk parsers of ingest.py run as Spark tasks (`runner`), in waves of one chunk per core;
each task writes its Parquet part into the scratch folder and returns its row accounting, merged on the
driver in file order. Stage 2: Spark DataFrame operations over those parts; each table the DuckDB engine
materialises (firsts, uc, users, f0, locs) is written as Parquet under work/spark and read back, so no
step holds more than a partition in memory. The kept records leave sorted by (user, time, file order):
range-partitioned by user code, sorted within partitions and written as Parquet, which the driver reads
file by file (in partition order) into shards of whole users (shards.write_records).

Every rule is engine.py's; the identity test (tests/integration/test_prepare_spark.py) holds the two to the
same store. The work folder must be on a filesystem every executor and the driver see (on one machine: any).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nextlocmoe.data.csvsource import _from_weekday_hour
from nextlocmoe.data.engine import _INT_ID, no_usable_users, origin_text, whole_user_batches
from nextlocmoe.data.ingest import Ingested
from nextlocmoe.data.parsing import DataError
from nextlocmoe.data.sanity import UNITS, judge_coordinates, time_unit
from nextlocmoe.data.sources import first_drop_line

_LOCAL_DIR: list[str] = []  # spark.local.dir of the session this process started (removed at exit)


@dataclass
class SparkCon:
    """The session, the scratch folder and the tables so far (engine.py's DuckDB connection)."""

    spark: object  # pyspark.sql.SparkSession
    work: Path
    parallelism: int
    partitions: int
    wave: int = 1  # parse tasks per wave (stage 1): the driver holds that many chunks
    t: dict = field(default_factory=dict)

    def close(self) -> None:
        """Drop this prepare's tables; the session stays for the next prepare (stopped at exit)."""
        self.t.clear()


def session(master: str | None, memory_gb: float):
    """The one place the Spark session is configured. ``master`` None: the one spark-submit set (or
    local[*] outside spark-submit). A local master gets a driver heap of 60 % of ``memory_gb``, the UI
    off, shuffle partitions 2 per core and spark.local.dir under a temporary folder; on a cluster those are
    the cluster's settings (spark-submit --conf)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise DataError(
            "--engine spark needs pyspark: pip install 'nextlocmoe[spark]' (and Java 17+)"
        ) from None
    if master is None and "PYSPARK_GATEWAY_PORT" not in os.environ:
        master = "local[*]"
    b = SparkSession.builder.appName("nextlocmoe-prepare").config("spark.ui.showConsoleProgress", "false")
    if master is not None:
        b = b.master(master)
    if master is not None and master.startswith("local"):
        if not _LOCAL_DIR:
            _LOCAL_DIR.append(tempfile.mkdtemp(prefix="nextlocmoe-spark-"))
            atexit.register(shutil.rmtree, _LOCAL_DIR[0], True)
        b = b.config("spark.ui.enabled", "false").config("spark.local.dir", _LOCAL_DIR[0])
        b = b.config("spark.driver.memory", f"{max(512, int(memory_gb * 0.6 * 1024))}m")
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers run this interpreter
    logging.getLogger("py4j").setLevel(logging.WARNING)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    if master is not None and spark.sparkContext.master != master:
        raise DataError(f"--spark-master {master}: this process already runs Spark on "
                        f"{spark.sparkContext.master} (one session per process)")  # fmt: skip
    if master is not None and master.startswith("local"):
        spark.conf.set("spark.sql.shuffle.partitions", str(2 * spark.sparkContext.defaultParallelism))
    return spark


def stop() -> None:
    """Stop this process's Spark session (if any) and remove the local folder it started with."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
    while _LOCAL_DIR:
        shutil.rmtree(_LOCAL_DIR.pop(), ignore_errors=True)


def connect(work: Path, memory_gb: float, master: str | None = None) -> SparkCon:
    """A Spark session (`session`) and the scratch folder ``work`` for this prepare."""
    spark = session(master, memory_gb)
    par = spark.sparkContext.defaultParallelism
    parts = int(spark.conf.get("spark.sql.shuffle.partitions"))
    return SparkCon(spark, Path(work).resolve(), par, parts, wave=par)


def describe(con: SparkCon) -> dict:
    """The engine as the manifest names it."""
    sc = con.spark.sparkContext
    return {
        "name": "spark",
        "version": con.spark.version,
        "master": sc.master,
        "parallelism": con.parallelism,
    }


def runner(con: SparkCon):
    """Stage 1's runner for ingest.ingest: ``fn(*job)`` as Spark tasks, ``con.wave`` jobs at a time (one
    per core, fewer when the driver's budget holds fewer chunks), results in job order."""
    sc = con.spark.sparkContext

    def run(fn, jobs) -> Iterator:
        jobs = iter(jobs)
        while wave := list(itertools.islice(jobs, con.wave)):
            yield from sc.parallelize(wave, len(wave)).map(lambda job: fn(*job)).collect()

    return run


def _uri(path: Path) -> str:
    return Path(path).resolve().as_uri()


def _save(con: SparkCon, df, name: str):
    """Materialise ``df`` as Parquet under work/spark/name (a DuckDB table) and read it back."""
    path = _uri(con.work / "spark" / name)
    df.write.mode("overwrite").parquet(path)
    con.t[name] = con.spark.read.parquet(path)
    return con.t[name]


def _finite(col: str):
    from pyspark.sql import functions as F

    return ~F.isnan(col) & (F.abs(col) != F.lit(float("inf")))


def check_rows(con: SparkCon, ing: Ingested, source: Path) -> None:
    """CSV file-wide checks in the reader's order (time unit, coordinates), then 'no usable rows'."""
    from pyspark.sql import functions as F

    parts = con.spark.read.parquet(_uri(ing.parts))
    con.t["src"] = parts.where("keep")
    spec = ing.spec
    if spec is not None and spec.time_col:
        ing.unit = time_unit(ing.units_seen, f"{ing.path}: column {spec.time_col}")
    if spec is not None and spec.lat_col and ing.coord_counts is not None:
        fin = parts.where(_finite("lat") & _finite("lon"))
        where = f"{ing.path}: columns {spec.lat_col}/{spec.lon_col}"
        medians = lambda: tuple(fin.agg(F.median("lat"), F.median("lon")).first())  # noqa: E731
        judge_coordinates(ing.coord_counts, medians, where, spec.force_coordinates)
    if con.t["src"].isEmpty():
        where = ing.path if ing.path is not None else source
        raise DataError(f"{where}: no usable rows of {ing.input_rows}: "
                        f"{first_drop_line(ing.dropped, ing.drop_first)}")  # fmt: skip


def _as_int(col: str):
    from pyspark.sql import functions as F

    c = F.col(col)
    return F.when(c.contains("."), c.cast("double").cast("bigint")).otherwise(c.cast("bigint"))


def id_expr(con: SparkCon, col: str):
    """A column of the ids of ``col``: as BIGINT when every distinct one is an integer and stays distinct
    (parsing.ids_as_int_if_all), else as read."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType

    src = con.t["src"]
    if not isinstance(src.schema[col].dataType, StringType):
        return F.col(col)
    x = F.col("x")
    ok = x.rlike(f"^{_INT_ID}\\z") & (F.length(F.regexp_extract(x, "^[+-]?([0-9]*)", 1)) <= 18)
    d = src.select(F.col(col).alias("x")).distinct()
    n, all_int = d.agg(F.count(F.lit(1)), F.bool_and(ok)).first()
    if not all_int:
        return F.col(col)
    distinct = d.agg(F.count_distinct(_as_int("x"))).first()[0]
    return _as_int(col) if distinct == n else F.col(col)


def time_expr(con: SparkCon, ing: Ingested, work: Path, batch_rows: int) -> tuple:
    """A t_min column and the time-origin text (engine.time_expr)."""
    from pyspark.sql import functions as F

    spec = ing.spec
    if spec is None:
        return F.col("t_min"), ing.time_origin
    if spec.time_col:
        div = float(dict(UNITS).get(ing.unit, 1.0))
        minutes = F.when(F.col("tnum_ok"), F.col("tnum") / F.lit(div) / F.lit(60.0)).otherwise(F.col("tiso"))
        con.t["src_t"] = src_t = con.t["src"].withColumn("minutes", minutes)
        origin_min = float(src_t.agg(F.floor(F.min("minutes") / F.lit(1440.0)) * 1440).first()[0])
        ing.columns.add("minutes")
        return F.floor(F.col("minutes") - F.lit(origin_min)).cast("bigint"), origin_text(ing, origin_min)
    return F.col("t_min"), _weekday_hour_times(con, ing, batch_rows)


def _arrow_chunks(rows, names: list[str], n: int):
    """Row objects -> Arrow record batches of ``n`` rows."""
    import pyarrow as pa

    while chunk := list(itertools.islice(rows, n)):
        yield pa.RecordBatch.from_pydict({k: [r[i] for r in chunk] for i, k in enumerate(names)})


def _weekday_hour_times(con: SparkCon, ing: Ingested, batch_rows: int) -> str:
    """Per-user reconstructed times (csvsource._from_weekday_hour on whole users, partitioned by user and
    sorted by file order within) into src_t."""
    from pyspark.sql import functions as F

    src = con.t["src"]
    has_order = bool(ing.spec.order_col)
    numeric = bool(src.agg(F.bool_and("ord_ok")).first()[0]) if has_order else None
    names = ["row", "user", "weekday", "hour"] + (["ord"] if has_order else [])

    def times(rows):
        for b in whole_user_batches(_arrow_chunks(rows, names, batch_rows), "user", batch_rows):
            order = b["ord"].astype(str) if has_order else None
            t, _ = _from_weekday_hour(b["user"], b["weekday"], b["hour"], order, numeric)
            yield from zip(b["row"].tolist(), t.tolist(), strict=True)

    part = src.select(*names).repartition(con.partitions, "user").sortWithinPartitions("user", "row")
    t = con.spark.createDataFrame(part.rdd.mapPartitions(times), "src_row long, t_min long")
    t = _save(con, t, "times")
    con.t["src_t"] = src.join(t, src["row"] == t["src_row"]).drop("src_row")
    one = np.array(["u"])
    return _from_weekday_hour(one, np.zeros(1, int), np.zeros(1, int), one if has_order else None)[1]


def create_records(con: SparkCon, ing: Ingested, user, venue, t_min, affine=None) -> None:
    """Table r: the kept rows with typed ids and t_min; ``affine`` = (scale, offset) as engine.py."""
    from pyspark.sql import functions as F

    src = con.t.get("src_t", con.t["src"])
    extra = [c for c in ("weekday", "hour", "dur", "category", "split", "minutes") if c in ing.columns]
    lat, lon = F.col("lat"), F.col("lon")
    if affine is not None:
        (s0, s1), (o0, o1) = affine
        lat = F.col("lat") * F.lit(float(s0)) + F.lit(float(o0))
        lon = F.col("lon") * F.lit(float(s1)) + F.lit(float(o1))
    cols = [user.alias("u"), venue.alias("v"), t_min.alias("t_min"), lat.alias("lat"), lon.alias("lon")]
    con.t["r"] = src.select("row", *cols, *extra)


def distinct_coordinates(con: SparkCon) -> np.ndarray:
    """[P, 2] distinct (lat, lon) pairs of r, sorted (np.unique(..., axis=0))."""
    d = con.t["r"].select("lat", "lon").distinct().orderBy("lat", "lon").toArrow()
    return np.stack([d.column("lat").to_numpy(), d.column("lon").to_numpy()], axis=1)


def check_users(con: SparkCon, need: int, source: Path) -> int:
    """engine.check_users: tables firsts (first row of each (user, venue, t_min)) and uc (distinct records
    per user); raises when no user has ``need``. Returns the duplicates."""
    from pyspark.sql import functions as F

    r = con.t["r"]
    firsts = _save(con, r.groupBy("u", "v", "t_min").agg(F.min("row").alias("row")).select("row"), "firsts")
    uc = _save(con, r.join(firsts, "row", "left_semi").groupBy("u").agg(F.count(F.lit(1)).alias("n")), "uc")
    n_rows = r.count()
    n_dup = n_rows - firsts.count()
    top_u, top_n = uc.orderBy(F.desc("n"), "u").first()
    if top_n < need:
        raise no_usable_users(source, n_rows, n_dup, need, top_u, top_n, uc.count())
    return int(n_dup)


def _dense_codes(con: SparkCon, df, col: str, code: str, name: str):
    """Table ``name``(col, code): the distinct values of df's ``col`` numbered 0.. in sorted order, without
    a single-partition window: range-partitioned (partition i holds the i-th range), numbered within each
    partition and offset by the sizes of the partitions before it."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ranged = df.repartitionByRange(con.partitions, col).withColumn("_p", F.spark_partition_id())
    ranged = _save(con, ranged, f"{name}_ranged")
    sizes = sorted(ranged.groupBy("_p").count().collect())
    start = np.concatenate([[0], np.cumsum([n for _, n in sizes])]).tolist()
    offsets = F.create_map(*[F.lit(v) for (p, _), s in zip(sizes, start, strict=False) for v in (p, s)])
    local = F.row_number().over(Window.partitionBy("_p").orderBy(col)) - 1
    return _save(con, ranged.select(col, (offsets[F.col("_p")] + local).cast("int").alias(code)), name)


def drop_and_number(con: SparkCon, need: int) -> int:
    """engine.drop_and_number: drop duplicates and short users, number users and locations by sorted id
    (tables users, f0, locs; f = f0 with location codes). Returns the rows dropped as user_too_short."""
    from pyspark.sql import functions as F

    uc = con.t["uc"]
    short = uc.where(F.col("n") < need).agg(F.coalesce(F.sum("n"), F.lit(0))).first()[0]
    users = _dense_codes(con, uc.where(F.col("n") >= need).select("u"), "u", "ucode", "users")
    f0 = _save(con, con.t["r"].join(con.t["firsts"], "row").join(users, "u"), "f0")
    locs = _dense_codes(con, f0.select("v").distinct(), "v", "loc", "locs")
    con.t["f"] = f0.join(locs, "v")
    return int(short)


def _ids(table, col: str, code: str) -> np.ndarray:
    """The ids of ``table`` in the order of their codes (engine._ids)."""
    import pyarrow as pa

    a = table.orderBy(code).select(col).toArrow().column(0)
    if pa.types.is_string(a.type) or pa.types.is_large_string(a.type):
        return np.array(a.to_pylist(), dtype=str)
    return a.to_numpy().astype(np.int64)


def _mode(con: SparkCon, n: int, cols: list[str], where) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per location code the most frequent tuple of ``cols`` among f's rows passing ``where`` (ties: the
    smallest; engine._mode): name -> (location codes [k], values [k]) for the k locations with such rows."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    g = con.t["f"].where(where).groupBy("loc", *cols).agg(F.count(F.lit(1)).alias("c"))
    first = F.row_number().over(Window.partitionBy("loc").orderBy(F.desc("c"), *cols))
    t = g.withColumn("_k", first).where("_k = 1").select("loc", *cols).toArrow()
    loc = t.column("loc").to_numpy()
    return {c: (loc, t.column(c)) for c in cols}


def users_and_locations(con: SparkCon, has_category: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """engine.users_and_locations: user ids [U] and the location table (id, lat, lon, category or None,
    count [L])."""
    from pyspark.sql import functions as F

    users, ids = _ids(con.t["users"], "u", "ucode"), _ids(con.t["locs"], "v", "loc")
    n = len(ids)
    out = {"id": ids, "lat": np.full(n, np.nan), "lon": np.full(n, np.nan), "category": None}
    for c, (loc, v) in _mode(con, n, ["lat", "lon"], _finite("lat") & _finite("lon")).items():
        out[c][loc] = v.to_numpy()
    counts = con.t["f"].groupBy("loc").agg(F.count(F.lit(1)).alias("c")).toArrow()
    out["count"] = np.zeros(n, dtype=np.int64)
    out["count"][counts.column("loc").to_numpy()] = counts.column("c").to_numpy()
    if has_category:
        loc, v = _mode(con, n, ["category"], F.length("category") > 0)["category"]
        cat = np.full(n, "", dtype=object)
        cat[loc] = v.to_pylist()
        out["category"] = cat.astype(str)
    return users, out


def record_count(con: SparkCon) -> int:
    """The kept records (table f0)."""
    return int(con.t["f0"].count())


def sorted_batches(con: SparkCon, columns: list[str], min_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The kept records sorted by (user, time, file order) in batches of whole users: written by the
    executors as range partitions of user codes, each sorted, then read by the driver in partition order."""
    import pyarrow.parquet as pq

    out = con.work / "spark" / "sorted"
    f = con.t["f"].repartitionByRange(con.partitions, "ucode").sortWithinPartitions("ucode", "t_min", "row")
    f.select(*columns).write.mode("overwrite").parquet(_uri(out))
    files = sorted(out.glob("part-*.parquet"))  # part-NNNNN: the partition index, in range order
    reader = (b for p in files for b in pq.ParquetFile(p).iter_batches(batch_size=min_rows))
    return whole_user_batches(reader, "ucode", min_rows)
