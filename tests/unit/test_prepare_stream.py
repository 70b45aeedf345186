"""The streaming prepare (issue 20) writes the same store as the in-memory reference and as today's prepare:
on the shipped data sets, on irregular CSVs (the exact reader's line accounting), across chunk boundaries
and with worker processes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from nextlocmoe.data import ingest, stream
from nextlocmoe.data.csvsource import CsvSpec
from nextlocmoe.data.parsing import DataError
from nextlocmoe.data.prepare import prepare, prepare_in_memory
from tests.conftest import SHARED_DATA

CATEGORIES = CsvSpec(user_col="label", venue_col="poi", weekday_col="day", hour_col="hour", order_col="tid",
                     lat_col="lat", lon_col="lon", category_col="category")  # fmt: skip
# content hashes of the fsq-nyc store written by the prepare before issue 20 (commit fc30cab; x/y are
# transcendental functions of lat/lon whose last bits may depend on the CPU, so they are left out)
FSQ_NYC_BEFORE = {
    "records/dur_min.npy": "b84ed523d982cf0f",
    "records/hour.npy": "24d5e96aa46688b6",
    "records/loc.npy": "03fe13ccd136affb",
    "records/pos.npy": "2b95918737a50bb0",
    "records/split.npy": "3643a8f15a91725c",
    "records/t_min.npy": "a1ffa435a82e7fc9",
    "records/user.npy": "00375d4e33a1da58",
    "records/weekday.npy": "f947fb57e75941a0",
    "samples_test.npy": "0e72ba80e166ba00",
    "samples_train.npy": "3709bb5214bc9aca",
    "samples_valid.npy": "2eb692f9b3d166a6",
    "users.npy": "517f0e618379bbd1",
    "locations.npz:id": "222103af3501c7ce",
    "locations.npz:lat": "fbb4f4565b22134b",
    "locations.npz:lon": "5a6f12b1870bd4b8",
    "locations.npz:category": "c45eb7a483127ddf",
    "locations.npz:count": "095ae82c8fa6b400",
}
need_shared = pytest.mark.skipif(not (SHARED_DATA / "fsq-nyc").is_dir(), reason="../shared/data not present")


def _h(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()[:16]


def arrays(d: Path) -> dict[str, np.ndarray]:
    out = {str(f.relative_to(d)): np.load(f) for f in sorted(d.rglob("*.npy"))}
    with np.load(d / "locations.npz") as z:
        out |= {f"locations.npz:{k}": z[k] for k in z.files}
    return out


def assert_same_store(a: Path, b: Path) -> None:
    """Every array (dtype, shape, values), stats.json and the manifest but timings and the shard index."""
    xa, xb = arrays(a), arrays(b)
    assert xa.keys() == xb.keys()
    for k in xa:
        assert xa[k].dtype == xb[k].dtype and xa[k].shape == xb[k].shape, k
        assert np.array_equal(xa[k], xb[k], equal_nan=xa[k].dtype.kind == "f"), k
    assert json.loads((a / "stats.json").read_text()) == json.loads((b / "stats.json").read_text())
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m.pop("timings_s")
        m.pop("shards", None)
    assert ma == mb


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7,000 rows, 2 workers, and the process pool even for small files."""
    monkeypatch.setattr(stream, "budget", lambda gb, threads: (7000, 0.5, 2))
    monkeypatch.setattr(ingest, "POOL_MIN_ROWS", 0)


@need_shared
def test_fsq_nyc_store_is_todays(tmp_path: Path) -> None:
    m = prepare("fsq-nyc", SHARED_DATA / "fsq-nyc", tmp_path / "s")
    got = {k: _h(v) for k, v in arrays(tmp_path / "s").items() if k in FSQ_NYC_BEFORE}
    assert got == FSQ_NYC_BEFORE
    assert (
        m["samples"] == {"train": 96235, "valid": 14829, "test": 29918} and m["dropped"]["duplicate"] == 458
    )
    prepare_in_memory("fsq-nyc", SHARED_DATA / "fsq-nyc", tmp_path / "m")
    assert_same_store(tmp_path / "s", tmp_path / "m")


@need_shared
@pytest.mark.parametrize("dataset", ["llmmob-fsq-nyc", "llmmob-geolife", "fsq-nyc-categories"])
def test_shipped_sets_in_chunks_and_workers(tmp_path: Path, small_chunks, dataset: str) -> None:
    kind, spec = ("csv", CATEGORIES) if dataset == "fsq-nyc-categories" else (dataset, None)
    m = prepare(kind, SHARED_DATA / dataset, tmp_path / "s", csv_spec=spec)
    prepare_in_memory(kind, SHARED_DATA / dataset, tmp_path / "m", csv_spec=spec)
    assert_same_store(tmp_path / "s", tmp_path / "m")
    assert len(m["shards"]) > 1


def test_shards_partition_users_and_records(tmp_path: Path, small_chunks) -> None:
    src = tmp_path / "c.csv"
    rng = np.random.default_rng(0)
    n = 30_000
    t = 1_600_000_000 + rng.integers(0, 10**7, n)
    rows = [f"u{u},{v},{s},{40 + v / 1e3},{-74 - v / 1e3}" for u, v, s in zip(rng.integers(0, 300, n),
            rng.integers(0, 500, n), t, strict=True)]  # fmt: skip
    src.write_text("user,venue,time,lat,lon\n" + "\n".join(rows) + "\n")
    spec = CsvSpec(time_col="time", lat_col="lat", lon_col="lon")
    m = prepare("csv", src, tmp_path / "s", 8, 3, csv_spec=spec)
    prepare_in_memory("csv", src, tmp_path / "m", 8, 3, csv_spec=spec)
    assert_same_store(tmp_path / "s", tmp_path / "m")
    user = np.load(tmp_path / "s" / "records" / "user.npy")
    ends = [(s["users"], s["records"]) for s in m["shards"]]
    assert ends[0][1][0] == 0 and ends[-1][1][1] == len(user) and ends[-1][0][1] == m["users"]
    for (u0, r0), (u1, r1) in zip(ends, ends[1:], strict=False):
        assert u0[1] == u1[0] and r0[1] == r1[0]
    for (ua, ub), (ra, rb) in ends:
        assert user[ra] == ua and user[rb - 1] == ub - 1


def _irregular_csv(path: Path) -> Path:
    """Timestamps in ms with fractions, text ids with spaces, a blank line, a short row, a quoted line break
    in an unused column, duplicates, a bad coordinate, a garbled time, one user too short."""
    lines = ["user,venue,time,lat,lon,note"]
    for i in range(120):
        u, v = f" u{i % 4} ", f"v{(i * 7) % 11}"
        lines.append(f"{u},{v},{1_650_000_000_000 + i * 3_600_123.5},{40.7 + (i % 11) / 100},-73.9,x")
        if i == 30:
            lines.append("")
        if i == 50:
            lines.append(f'u1,v2,{1_650_000_000_000 + i * 3_600_123.5},40.71,-73.9,"two\nlines"')
        if i == 60:
            lines.append("u2,v3,1650000000000")
    lines += [lines[5], lines[6], "u9,v1,1650000000000,40.7,-73.9,x", "u3,v1,oops,40.7,-73.9,x"]
    lines.append("u3,v1,1650000000000,95.0,-73.9,x")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_irregular_csv_same_accounting(tmp_path: Path, small_chunks, monkeypatch) -> None:
    monkeypatch.setattr(stream, "budget", lambda gb, threads: (40, 0.5, 2))  # the fast reader yields first
    src = _irregular_csv(tmp_path / "c.csv")
    spec = CsvSpec(time_col="time", lat_col="lat", lon_col="lon")
    m = prepare("csv", src, tmp_path / "s", 6, 3, csv_spec=spec)
    prepare_in_memory("csv", src, tmp_path / "m", 6, 3, csv_spec=spec)
    assert_same_store(tmp_path / "s", tmp_path / "m")
    d = m["dropped"]
    assert d["malformed_row"] == 1 and d["duplicate"] == 2 and d["unparsable_time"] == 1
    assert d["bad_coordinate"] == 1 and d["user_too_short"] == 1
    assert m["input_rows"] == 127 and m["kept_rows"] + sum(d.values()) == 127
    assert m["drop_examples"]["malformed_row"] == ["c.csv:66"]  # after the blank line and the 2-line row
    assert "unix milliseconds" in m["time_origin"]


def _weekday_csv(path: Path) -> Path:
    """Weekday/hour CSV with an order column, ids '007'/'1'/'2' (integers), empty categories."""
    days = ["Monday", "tue", "3", "Thursday", "fri", "Saturday", "sun"]
    lines = ["tid,label,day,hour,poi,lat,lon,category"]
    for i in range(200):
        lines.append(f"{i // 9},{'007' if i % 3 == 0 else i % 3},{days[i % 7]},{(i * 5) % 24},{i % 13},"
                     f"{40.7 + (i % 13) / 100},-73.95,{'' if i % 4 == 0 else 'c' + str(i % 2)}")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def test_weekday_hour_order_and_int_ids_across_chunks(tmp_path: Path, small_chunks, monkeypatch) -> None:
    monkeypatch.setattr(stream, "budget", lambda gb, threads: (25, 0.5, 2))
    _weekday_csv(tmp_path / "w.csv")
    m = prepare("csv", tmp_path / "w.csv", tmp_path / "s", 6, 3, csv_spec=CATEGORIES)
    prepare_in_memory("csv", tmp_path / "w.csv", tmp_path / "m", 6, 3, csv_spec=CATEGORIES)
    assert_same_store(tmp_path / "s", tmp_path / "m")
    assert np.load(tmp_path / "s" / "users.npy").dtype.kind == "i"  # '007', '1', '2' -> 7, 1, 2
    assert "reconstructed per user" in m["time_origin"]


def test_errors_match_the_reference(tmp_path: Path) -> None:
    src = tmp_path / "c.csv"
    src.write_text("user,venue,time\n" + "".join(f"u{i},v{i},{1_600_000_000 + i}\n" for i in range(20)))
    spec = CsvSpec(time_col="time")
    msgs = []
    for fn in (prepare, prepare_in_memory):
        with pytest.raises(DataError, match="no usable users") as e:
            fn("csv", src, tmp_path / fn.__name__, csv_spec=spec)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]
    assert not list(tmp_path.glob(".*")), "no scratch or partial folders left behind"


def test_spark_master_needs_the_spark_engine(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--spark-master local.2. needs --engine spark"):
        prepare("fsq-nyc", tmp_path, tmp_path / "o", spark_master="local[2]")
    with pytest.raises(DataError, match="unknown engine 'ray'"):
        prepare("fsq-nyc", tmp_path, tmp_path / "o", engine="ray")
