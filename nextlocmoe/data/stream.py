"""The streaming prepare (docs/DATA.md): source -> Parquet parts (ingest.py, one chunk in memory) ->
DuckDB (engine.py, out of core under a memory limit, all cores) -> the store written shard by shard
(shards.py). Same row accounting and the same store as the in-memory reference (prepare_in_memory)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from nextlocmoe.data import engine
from nextlocmoe.data.ingest import ingest
from nextlocmoe.data.layout import compact_str, compute_stats, iter_store_records, write_json
from nextlocmoe.data.parsing import DataError, load_npy
from nextlocmoe.data.recovery import register_affine
from nextlocmoe.data.shards import write_records
from nextlocmoe.geo import latlon_to_mercator

BYTES_PER_CHUNK_ROW = 1200  # peak Python-side bytes per row of a chunk being parsed (measured, 1M rows)


def budget(memory_gb: float, threads: int) -> tuple[int, float, int]:
    """(rows per chunk, DuckDB memory limit GB, threads) for a total budget of ``memory_gb``. Reading,
    ``threads`` worker processes parse a chunk each with one more queued; then DuckDB gets 60 % of the
    budget while Python holds one batch of users being finished and written."""
    if memory_gb < 0.5:
        raise DataError(f"--memory-gb {memory_gb}: need at least 0.5")
    threads = threads or os.cpu_count() or 1
    rows = int(min(max(memory_gb * 1e9 / (threads + 2) / BYTES_PER_CHUNK_ROW, 10_000), 1_000_000))
    return rows, memory_gb * 0.6, threads


def recovery_fit(pairs: np.ndarray, reference_poi: Path | None) -> dict:
    """Affine registration of llmmob-fsq-nyc's distinct [-1, 1] (lat, lon) pairs [P, 2] to a WGS84 venue
    table (recovery.py); ``attempted`` False when the table is missing."""
    if reference_poi is None or not Path(reference_poi).is_file():
        return {"attempted": False, "reason": f"reference venue table not found: {reference_poi}",
                "reference": str(reference_poi)}  # fmt: skip
    ref = load_npy(Path(reference_poi), 3, "f", "rows [venue_id, latitude, longitude]")[:, 1:]
    fit = register_affine(pairs, ref)
    fit["reference"] = str(reference_poi)
    return fit


def prepare_stream(dataset: str, source: Path, tmp: Path, work: Path, opts: dict) -> tuple:
    """Prepare into the empty folder ``tmp`` using scratch folder ``work``; returns (ingested, counts for
    the manifest, timings, recovery). ``opts``: history, current, min_history, duration_cap_min,
    csv_spec, reference_poi, memory_gb, threads, and optionally engine ("duckdb", the default, or
    "spark": data/spark_engine.py, the same steps as Spark tasks) and spark_master."""
    t0 = time.perf_counter()
    chunk_rows, duck_gb, threads = budget(opts["memory_gb"], opts["threads"])  # shards: both engines
    parse_rows = chunk_rows
    if opts.get("engine", "duckdb") == "spark":
        from nextlocmoe.data import spark_engine as eng

        con = eng.connect(work, opts["memory_gb"], opts.get("spark_master"))
        parse_rows, _, threads = budget(opts["memory_gb"], con.parallelism)
        fit = int(opts["memory_gb"] * 1e9 / BYTES_PER_CHUNK_ROW / parse_rows) - 2  # chunks the budget holds
        con.wave = max(1, min(con.parallelism, fit))  # chunks the driver ships per wave of parse tasks
    else:
        eng = engine
        con = engine.connect(work, duck_gb, threads)
    t_start = time.perf_counter() - t0
    try:
        ing = ingest(dataset, source, opts["csv_spec"], work / "parts", parse_rows, threads, eng.runner(con))
        timings = {"engine_start_s": t_start, "read_s": time.perf_counter() - t0 - t_start}
        ing, n_records, users, locs, recovery = _global_steps(eng, con, ing, dataset, source, work, opts)
        timings["engine_s"] = time.perf_counter() - t0 - t_start - timings["read_s"]
        t1 = time.perf_counter()
        cols = ["ucode", "loc", "t_min", "lat", "lon"]
        cols += [c for c in ("weekday", "hour", "dur", "split", "minutes") if c in ing.columns]
        window = (opts["current"], opts["min_history"], opts["duration_cap_min"])
        tz = opts["csv_spec"].timezone if opts["csv_spec"] is not None else None
        batches = eng.sorted_batches(con, cols, chunk_rows)
        res = write_records(batches, n_records, locs, tmp, window, tz)
        if eng is not engine:
            res["engine"] = eng.describe(con)
    finally:
        con.close()
    np.savez(tmp / "locations.npz", **(locs | {"id": compact_str(locs["id"])}))
    np.save(tmp / "users.npy", compact_str(users))
    stats = compute_stats(lambda: iter_store_records(tmp, ("x", "y", "dur_min", "split"), chunk_rows))
    write_json(tmp / "stats.json", stats)
    timings["write_s"] = time.perf_counter() - t1
    res.update(
        users=len(users),
        locations=len(locs["id"]),
        records=n_records,
        has_xy=bool(np.isfinite(locs["x"]).any()),
    )
    return ing, res, timings, recovery


def _global_steps(eng, con, ing, dataset: str, source: Path, work: Path, opts: dict) -> tuple:
    """Stage 2 on engine module ``eng`` (engine.py or spark_engine.py, one set of function names): the
    file-wide checks, ids and times, duplicates and short users, recovery, dense codes, location table.
    Returns (ingested, kept records, user ids [U], location table, recovery or None)."""
    chunk_rows = budget(opts["memory_gb"], opts["threads"])[0]
    eng.check_rows(con, ing, source)
    user, venue = eng.id_expr(con, "user"), eng.id_expr(con, "venue")
    t_sql, ing.time_origin = eng.time_expr(con, ing, work, chunk_rows)
    eng.create_records(con, ing, user, venue, t_sql)
    need = opts["current"] + 1 + opts["min_history"]
    n_dup = eng.check_users(con, need, source)
    recovery = None
    if dataset == "llmmob-fsq-nyc":
        ref = opts["reference_poi"] or Path(source).parent / "fsq-nyc" / "NYC_POI.npy"
        recovery = recovery_fit(eng.distinct_coordinates(con), ref)
        if recovery.get("accepted"):
            affine = (recovery["scale"], recovery["offset"])
            eng.create_records(con, ing, user, venue, t_sql, affine)
            ing.coordinate_units = "degrees"
    ing.dropped["duplicate"] += n_dup
    ing.dropped["user_too_short"] += eng.drop_and_number(con, need)
    users, locs = eng.users_and_locations(con, "category" in ing.columns)
    return ing, eng.record_count(con), users, location_table(locs, ing.coordinate_units), recovery


def location_table(locs: dict[str, np.ndarray], units: str) -> dict[str, np.ndarray]:
    """The engine's location modes -> the store's table: id, lat, lon, x, y (Web-Mercator metres, or the
    source units when normalised), category ('' none), count."""
    lat, lon = locs["lat"], locs["lon"]
    x, y = latlon_to_mercator(lat, lon)
    if units == "normalised":
        x, y = lon.copy(), lat.copy()
    category = locs["category"]
    if category is None:
        category = np.full(len(lat), "", dtype=object).astype(str)
    return {
        "id": locs["id"],
        "lat": lat,
        "lon": lon,
        "x": x,
        "y": y,
        "category": category,
        "count": locs["count"],
    }
