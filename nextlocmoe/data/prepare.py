"""`nextlocmoe prepare`: read a source, build windows and splits, write the store and manifest.json."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from nextlocmoe.data.csvsource import CsvSpec, read_csv_source
from nextlocmoe.data.layout import write_json, write_store
from nextlocmoe.data.parsing import DataError
from nextlocmoe.data.sources import RecordTable, first_drop_line, read_fsq_nyc, read_llmmob
from nextlocmoe.data.stream import prepare_stream, recovery_fit
from nextlocmoe.data.windows import build

log = logging.getLogger(__name__)
DATASETS = ("fsq-nyc", "llmmob-fsq-nyc", "llmmob-geolife", "csv")
ENGINES = ("duckdb", "spark")
FORMAT_VERSION = 1


def read_source(dataset: str, source: Path, csv_spec: CsvSpec | None = None) -> RecordTable:
    """Dispatch to the reader of `dataset`."""
    if dataset == "fsq-nyc":
        return read_fsq_nyc(source)
    if dataset in ("llmmob-fsq-nyc", "llmmob-geolife"):
        return read_llmmob(source, dataset)
    if dataset == "csv":
        return read_csv_source(source, csv_spec or CsvSpec())
    raise DataError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def recover_llmmob_coordinates(table: RecordTable, reference_poi: Path | None) -> dict:
    """Try to map llmmob-fsq-nyc's [-1, 1] coordinates to WGS84; updates table in place when accepted."""
    fit = recovery_fit(np.unique(np.stack([table.lat, table.lon], axis=1), axis=0), reference_poi)
    if fit.get("accepted"):
        table.lat = table.lat * fit["scale"][0] + fit["offset"][0]
        table.lon = table.lon * fit["scale"][1] + fit["offset"][1]
        table.coordinate_units = "degrees"
    return fit


def _check_inputs(
    dataset: str,
    source: str | Path,
    out: str | Path,
    history: int,
    current: int,
    min_history: int,
    duration_cap_min: float,
) -> tuple[Path, Path]:
    """The checks both prepares make before reading anything; returns (source, out) as paths."""
    if history < 1 or current < 1 or min_history < 0 or duration_cap_min <= 0:
        raise DataError("need --history >= 1, --current >= 1, --min-history >= 0, --duration-cap-min > 0")
    if min_history > history:
        raise DataError(f"--min-history {min_history} exceeds --history {history}")
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    source, out = Path(source), Path(out)
    if not source.exists():
        raise DataError(f"{source}: source not found")
    check_out_dir(out)
    return source, out


def _check_engine(engine: str, spark_master: str | None) -> None:
    if engine not in ENGINES:
        raise DataError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    if spark_master is not None and engine != "spark":
        raise DataError(f"--spark-master {spark_master} needs --engine spark")


def prepare(
    dataset: str,
    source: str | Path,
    out: str | Path,
    history: int = 40,
    current: int = 5,
    min_history: int = 1,
    duration_cap_min: float = 1440.0,
    csv_spec: CsvSpec | None = None,
    reference_poi: str | Path | None = None,
    memory_gb: float = 3.0,
    threads: int = 0,
    engine: str = "duckdb",
    spark_master: str | None = None,
) -> dict:
    """Prepare one data set into `out` (streaming: memory within ``memory_gb`` whatever the row count,
    ``threads`` cores, 0 = all; data/stream.py); returns the manifest (also written to out/manifest.json).
    ``engine`` "spark": the same steps on Spark (data/spark_engine.py; ``spark_master`` e.g. local[2],
    spark://host:7077, or None for the one spark-submit set) with the same store; the manifest then
    names the engine."""
    _check_engine(engine, spark_master)
    source, out = _check_inputs(dataset, source, out, history, current, min_history, duration_cap_min)
    t0 = time.perf_counter()
    opts = {"history": history, "current": current, "min_history": min_history}
    opts |= {"duration_cap_min": duration_cap_min, "csv_spec": csv_spec, "memory_gb": memory_gb}
    opts |= {"threads": threads, "reference_poi": None if reference_poi is None else Path(reference_poi)}
    opts |= {"engine": engine, "spark_master": spark_master}
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()

    def build_into(tmp: Path) -> dict:
        tmp.mkdir(parents=True)
        ing, res, timings, recovery = prepare_stream(dataset, source, tmp, work, opts)
        shutil.rmtree(work, ignore_errors=True)
        log.info("read %s: %d rows; %d records kept", dataset, ing.input_rows, res["records"])
        m = _manifest(ing, res, history, current, min_history, duration_cap_min, recovery)
        m["shards"] = res["shards"]
        if "engine" in res:
            m["engine"] = res["engine"]
        m["timings_s"] = timings
        return m

    try:
        return write_atomically(build_into, out, t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare_in_memory(
    dataset: str,
    source: str | Path,
    out: str | Path,
    history: int = 40,
    current: int = 5,
    min_history: int = 1,
    duration_cap_min: float = 1440.0,
    csv_spec: CsvSpec | None = None,
    reference_poi: str | Path | None = None,
) -> dict:
    """The in-memory reference of `prepare` (the readers' RecordTable -> windows.build -> write_store):
    the whole source in memory, one core. Kept as the specification the streaming prepare is tested
    against (identical stores); not for large sources."""
    source, out = _check_inputs(dataset, source, out, history, current, min_history, duration_cap_min)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    table = read_source(dataset, source, csv_spec)
    timings["read_s"] = time.perf_counter() - t0
    if len(table) == 0:
        raise DataError(f"{source}: no usable rows of {table.input_rows}: "
                        f"{first_drop_line(table.dropped, table.drop_first)}")  # fmt: skip
    check_enough_records(table, source, current + 1 + min_history)
    recovery = None
    if dataset == "llmmob-fsq-nyc":
        if reference_poi is None:
            reference_poi = source.parent / "fsq-nyc" / "NYC_POI.npy"
        recovery = recover_llmmob_coordinates(table, Path(reference_poi))
    prep = build(table, history, current, min_history, duration_cap_min)
    timings["windows_s"] = time.perf_counter() - t0 - timings["read_s"]
    rec = prep.records
    res = {
        "users": len(prep.user_ids),
        "locations": len(prep.locations["id"]),
        "records": len(rec["t_min"]),
        "samples": {k: len(v) for k, v in prep.samples.items()},
        "records_per_split": {
            s: int((rec["split"] == i).sum()) for i, s in enumerate(("train", "valid", "test"))
        },
        "has_xy": bool(np.isfinite(prep.locations["x"]).any()),
        "info": prep.info,
    }
    table.dropped = prep.dropped
    manifest = _manifest(table, res, history, current, min_history, duration_cap_min, recovery)
    manifest["timings_s"] = timings

    def build_into(tmp: Path) -> dict:
        write_store(prep, tmp, manifest)
        return manifest

    return write_atomically(build_into, out, t0)


def check_out_dir(out: Path) -> None:
    """``--out`` must be new, empty, or an earlier ``prepare`` output (which is then replaced whole)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and not (out / "manifest.json").is_file():
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            n = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
            raise DataError(
                f"--out {out}: folder is not empty ({n}, e.g. {entries[0]!r}) and is not "
                "a `nextlocmoe prepare` output (no manifest.json); give a new or empty folder"
            )


def check_enough_records(table: RecordTable, source: Path, need: int) -> None:
    """DataError when no user has the ``need`` = current + 1 + min_history distinct records (user, venue,
    t_min; duplicates are dropped first) a sample takes: every row would be dropped."""
    users, ucode = np.unique(table.user, return_inverse=True)
    vcode = np.unique(table.venue, return_inverse=True)[1]
    distinct = np.unique(np.stack([ucode.reshape(-1), vcode.reshape(-1), table.t_min], axis=1), axis=0)
    counts = np.bincount(distinct[:, 0], minlength=len(users))
    if counts.max() >= need:
        return
    top = int(np.argmax(counts))
    dups = len(table) - len(distinct)
    raise DataError(
        f"{source}: no usable users: all {len(table)} usable rows would be dropped as user_too_short"
        + (f" or duplicate ({dups} duplicates)" if dups else "")
        + f": every user has fewer than {need} distinct records (--current + 1 + --min-history); the most "
        f"is user {users[top].item()!r} with {int(counts[top])} (of {len(users)} users)"
    )


def write_atomically(build_into, out: Path, t0: float) -> dict:
    """``build_into(tmp)`` writes the store into a temporary sibling folder and returns its manifest, which
    is written last; then the folder is swapped in for ``out``: a failed or interrupted prepare leaves no
    half-written folder (and an earlier output untouched)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        t2 = time.perf_counter()
        manifest = build_into(tmp)
        manifest["timings_s"].setdefault("write_s", time.perf_counter() - t2)
        manifest["timings_s"]["total_s"] = time.perf_counter() - t0
        write_json(tmp / "manifest.json", manifest)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _manifest(table, res: dict, history: int, current: int, min_history: int, cap: float, recovery) -> dict:
    """manifest.json: ``table`` is the reader's accounting (a RecordTable or ingest.Ingested), ``res`` the
    store's counts (users, locations, records, samples, records_per_split, has_xy, info)."""
    has_xy = res["has_xy"]
    units = table.coordinate_units if has_xy else "none"
    kept, dropped = res["records"], sum(table.dropped.values())
    if kept + dropped != table.input_rows:
        raise DataError(f"row accounting broken: kept {kept} + dropped {dropped} != input {table.input_rows}")
    if kept == 0:
        raise DataError(f"no records left of {table.input_rows} rows: "
                        f"{first_drop_line(table.dropped, table.drop_first)}")  # fmt: skip
    m = {
        "dataset": table.dataset,
        "source_sha256": table.source_sha256,
        "users": int(res["users"]),
        "locations": int(res["locations"]),
        "records": int(kept),
        "samples": {k: int(v) for k, v in res["samples"].items()},
        "dropped": {k: int(v) for k, v in sorted(table.dropped.items())},
        "drop_examples": {k: v for k, v in sorted(table.drop_examples.items()) if v},
        "drop_first_example": dict(sorted(table.drop_first.items())),
        "time_origin": table.time_origin,
        "history": history,
        "current": current,
        "format_version": FORMAT_VERSION,
        "input_rows": int(table.input_rows),
        "kept_rows": int(kept),
        "min_history": min_history,
        "duration_cap_min": cap,
        "has_coordinates": has_xy,
        "coordinate_units": units,
        "split_codes": {"train": 0, "valid": 1, "test": 2},
        "records_per_split": res["records_per_split"],
    }
    m["coordinate_system"] = coordinate_system(table, units, recovery)
    if units == "normalised":
        m["coordinate_note"] = (
            "x/y are the source's normalised [-1, 1] units, NOT metres; distances are not metres"
        )
    if recovery is not None:
        m["coordinate_recovery"] = recovery
    m.update(res["info"])
    m.update(table.extra)
    return m


def coordinate_system(table: RecordTable, units: str, recovery: dict | None) -> str:
    """One line: which coordinates the store holds and why (summary line and manifest)."""
    if units == "none":
        return "none (the data set has no coordinates)"
    if units == "degrees" and recovery is None:
        src = "NYC_POI.npy venue table" if table.dataset == "fsq-nyc" else "the lat/lon columns"
        return f"WGS84 from {src}; x/y Web-Mercator metres"
    if units == "degrees":
        return (
            f"WGS84, recovered (affine registration to {recovery['reference']}), median residual "
            f"{recovery['median_residual_m']:.2f} m; x/y Web-Mercator metres"
        )
    if recovery is None:
        return "normalised source units (not metres)"
    if not recovery.get("attempted", True):
        why = f"no reference venue table at {recovery['reference']}"
    else:
        why = (
            f"recovery against {recovery['reference']} rejected: median residual "
            f"{recovery['median_residual_m']:.1f} m >= 30 m"
        )
    return f"normalised source units [-1, 1], not metres ({why})"
