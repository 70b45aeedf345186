"""The distributed prepare (issue 20): `prepare --engine spark` in Spark local mode with 2 workers writes the
store the single-machine (DuckDB) prepare writes, array by array, on the shipped data sets and on an
irregular CSV read in small chunks (many Spark tasks, several shards). One Spark session serves the module
(started by the first test, ~15 s)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nextlocmoe.data import stream
from nextlocmoe.data.csvsource import CsvSpec
from nextlocmoe.data.parsing import DataError
from nextlocmoe.data.prepare import prepare
from tests.conftest import SHARED_DATA
from tests.unit.test_prepare_stream import CATEGORIES, _irregular_csv, _weekday_csv, assert_same_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]
need_shared = pytest.mark.skipif(not (SHARED_DATA / "fsq-nyc").is_dir(), reason="../shared/data not present")
SPARK = {"engine": "spark", "spark_master": "local[2]"}


@pytest.fixture(scope="module", autouse=True)
def _stop_spark():
    """The session the first test starts serves the module; stopped after it (its JVM holds ~1 GB)."""
    yield
    from nextlocmoe.data import spark_engine

    spark_engine.stop()


def _spark_vs_duckdb(tmp_path: Path, *args, **kw) -> tuple[dict, dict]:
    """Both prepares of the same source; asserts identical stores (every array, stats, the manifest but
    timings and the engine) and returns both manifests."""
    md = prepare(*args[:2], tmp_path / "duckdb", *args[2:], **kw)
    ms = prepare(*args[:2], tmp_path / "spark", *args[2:], **kw, **SPARK)
    assert ms["engine"]["name"] == "spark" and ms["engine"]["master"] == "local[2]"
    assert ms["engine"]["parallelism"] == 2
    manifest = tmp_path / "spark" / "manifest.json"
    m = json.loads(manifest.read_text())
    m.pop("engine")
    manifest.write_text(json.dumps(m))
    assert_same_store(tmp_path / "spark", tmp_path / "duckdb")
    assert ms["shards"] == md["shards"]
    return md, ms


@need_shared
def test_fsq_nyc_spark_store_is_the_single_machine_one(tmp_path: Path) -> None:
    _, m = _spark_vs_duckdb(tmp_path, "fsq-nyc", SHARED_DATA / "fsq-nyc")
    assert m["samples"] == {"train": 96235, "valid": 14829, "test": 29918}
    assert m["dropped"]["duplicate"] == 458


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7,000 rows: several parse tasks per wave, several Parquet parts and shards."""
    monkeypatch.setattr(stream, "budget", lambda gb, threads: (7000, 0.5, 2))


@need_shared
@pytest.mark.parametrize("dataset", ["llmmob-fsq-nyc", "llmmob-geolife", "fsq-nyc-categories"])
def test_shipped_sets_in_chunks(tmp_path: Path, small_chunks, dataset: str) -> None:
    kind, spec = ("csv", CATEGORIES) if dataset == "fsq-nyc-categories" else (dataset, None)
    _, m = _spark_vs_duckdb(tmp_path, kind, SHARED_DATA / dataset, csv_spec=spec)
    assert len(m["shards"]) > 1


def test_irregular_csv_same_accounting(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(stream, "budget", lambda gb, threads: (40, 0.5, 2))
    src = _irregular_csv(tmp_path / "c.csv")
    spec = CsvSpec(time_col="time", lat_col="lat", lon_col="lon")
    _, m = _spark_vs_duckdb(tmp_path, "csv", src, 6, 3, csv_spec=spec)
    d = m["dropped"]
    assert d["malformed_row"] == 1 and d["duplicate"] == 2 and d["user_too_short"] == 1
    assert m["drop_examples"]["malformed_row"] == ["c.csv:66"]
    assert "unix milliseconds" in m["time_origin"]


def test_weekday_hour_order_and_int_ids(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(stream, "budget", lambda gb, threads: (25, 0.5, 2))
    src = _weekday_csv(tmp_path / "w.csv")
    _, m = _spark_vs_duckdb(tmp_path, "csv", src, 6, 3, csv_spec=CATEGORIES)
    assert np.load(tmp_path / "spark" / "users.npy").dtype.kind == "i"  # '007', '1', '2' -> 7, 1, 2
    assert "reconstructed per user" in m["time_origin"] and len(m["shards"]) > 1


def test_errors_match_the_single_machine_ones(tmp_path: Path) -> None:
    src = tmp_path / "c.csv"
    src.write_text("user,venue,time\n" + "".join(f"u{i},v{i},{1_600_000_000 + i}\n" for i in range(20)))
    msgs = []
    for kw in ({}, SPARK):
        with pytest.raises(DataError, match="no usable users") as e:
            prepare("csv", src, tmp_path / "o", csv_spec=CsvSpec(time_col="time"), **kw)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]
    assert not list(tmp_path.glob(".*")), "no scratch or partial folders left behind"
