"""Input sanity for `prepare --dataset csv` (nextlocmoe/data/sanity.py, issue 21): time units, swapped or
projected coordinates, a file changing while read, compressed CSV and Parquet, duplicate columns."""

from __future__ import annotations

import gzip
import threading
from pathlib import Path

import numpy as np
import pytest

from nextlocmoe.data.csvsource import CsvSpec
from nextlocmoe.data.parsing import DataError
from nextlocmoe.data.prepare import prepare

T0 = 1333238400  # 2012-04-01T00:00:00Z


def write_csv(path: Path, scale: float = 1.0, swap: bool = False, n_users: int = 4, per_user: int = 30,
              times: list | None = None) -> Path:  # fmt: skip
    """user,venue,time,lat,lon with unix times (x ``scale``: 1000 = milliseconds), NYC coordinates."""
    lines = ["user,venue,time,lat,lon"]
    k = 0
    for u in range(n_users):
        for i in range(per_user):
            v = (u * 7 + i * 3) % 9
            lat, lon = 40.70 + 0.01 * v, -74.00 + 0.01 * v
            if swap:
                lat, lon = lon, lat
            t = times[k] if times is not None else int((T0 + 3600 * (5 * i + u)) * scale)
            lines.append(f"u{u},{v},{t},{lat:.5f},{lon:.5f}")
            k += 1
    path.write_text("\n".join(lines) + "\n")
    return path


def prep(src: Path, out: Path, **spec) -> dict:
    s = CsvSpec(time_col="time", lat_col="lat", lon_col="lon", **spec)
    return prepare("csv", src, out, history=6, current=3, csv_spec=s)


def test_epoch_milliseconds_are_detected_and_stated(tmp_path: Path) -> None:
    """Before: milliseconds were taken as seconds (time origin in the year 44225, every duration capped)."""
    m_s = prep(write_csv(tmp_path / "s.csv"), tmp_path / "ps")
    m_ms = prep(write_csv(tmp_path / "ms.csv", 1000.0), tmp_path / "pms")
    assert "read as unix milliseconds" in m_ms["time_origin"] and "2012-04-01" in m_ms["time_origin"]
    assert "read as unix seconds" in m_s["time_origin"]
    for f in ("samples_train.npy", "samples_test.npy", "records/t_min.npy"):
        assert np.array_equal(np.load(tmp_path / "ps" / f), np.load(tmp_path / "pms" / f)), f


def test_a_mix_of_time_units_is_refused(tmp_path: Path) -> None:
    n = 4 * 30
    times = [T0 + 3600 * i for i in range(n)]
    times[7] *= 1000  # one row in milliseconds
    with pytest.raises(
        DataError, match=r"more than one unit \(unix seconds: 119 rows.*unix milliseconds: 1 rows"
    ):
        prep(write_csv(tmp_path / "mix.csv", times=times), tmp_path / "p")
    times[7] = "2012-04-01T07:00:00Z"
    with pytest.raises(DataError, match="ISO-8601 text: 1 rows"):
        prep(write_csv(tmp_path / "mix2.csv", times=times), tmp_path / "p2")


def test_swapped_or_projected_coordinates_are_refused(tmp_path: Path) -> None:
    """Before: NYC with latitude and longitude swapped was kept, venues placed in Antarctica."""
    src = write_csv(tmp_path / "sw.csv", swap=True)
    with pytest.raises(DataError, match="Antarctica .* look swapped: swap --lat-col and --lon-col"):
        prep(src, tmp_path / "p")
    m = prep(src, tmp_path / "pf", force_coordinates=True)  # the user's call
    assert m["kept_rows"] == 120
    proj = tmp_path / "proj.csv"
    proj.write_text(src.read_text().replace(",-74.0", ",-8238000.").replace(",40.7", ",4970000."))
    with pytest.raises(DataError, match="outside degree ranges .* projected"):
        prep(proj, tmp_path / "pp")


def test_duplicate_column_names_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "dup.csv"
    text = write_csv(tmp_path / "x.csv").read_text().splitlines()
    src.write_text("\n".join([text[0] + ",lat"] + [ln + ",0" for ln in text[1:]]) + "\n")
    with pytest.raises(DataError, match=r"duplicate column name\(s\) \{'lat': \[4, 6\]\}"):
        prep(src, tmp_path / "p")


@pytest.mark.parametrize("kind", ["gz", "zst", "parquet"])
def test_compressed_csv_and_parquet_prepare_the_same_store(tmp_path: Path, kind: str) -> None:
    """Before: "not UTF-8 text (re-save the file as UTF-8)"."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    plain = write_csv(tmp_path / "c.csv")
    if kind == "gz":
        src = tmp_path / "c.csv.gz"
        src.write_bytes(gzip.compress(plain.read_bytes()))
    elif kind == "zst":
        src = tmp_path / "c.csv.zst"
        with pa.output_stream(str(src), compression="zstd") as f:
            f.write(plain.read_bytes())
    else:
        src = tmp_path / "c.parquet"
        pq.write_table(pacsv.read_csv(plain), src)
    a, b = prep(plain, tmp_path / "pa"), prep(src, tmp_path / "pb")
    for k in ("input_rows", "kept_rows", "dropped", "users", "locations"):
        assert a[k] == b[k], k
    for f in ("samples_train.npy", "samples_valid.npy", "samples_test.npy", "records/loc.npy"):
        assert np.array_equal(np.load(tmp_path / "pa" / f), np.load(tmp_path / "pb" / f)), (kind, f)
    if kind != "parquet":  # the hash is of the (decompressed) bytes read
        assert b["source_sha256"]["c.csv." + kind] == a["source_sha256"]["c.csv"]


def test_a_file_still_being_written_is_refused(tmp_path: Path, monkeypatch) -> None:
    """Before: rc 0, and the manifest's sha256 matched neither the rows read nor the final file. A writer
    thread appends while prepare reads; the reader's first chunk signals it, so the append is known to fall
    inside the read (an unsynchronised writer could be starved of the GIL for the whole read: flaky)."""
    from nextlocmoe.data import sanity

    src = write_csv(tmp_path / "grow.csv", n_users=100, per_user=400)  # 40,000 rows: many read chunks
    reading, appended = threading.Event(), threading.Event()
    real = sanity.HashingReader.readinto

    def readinto(self, b) -> int:
        reading.set()
        n = real(self, b)
        if not appended.is_set():
            appended.wait(10)  # the writer gets in after this first chunk
        return n

    def append() -> None:
        reading.wait(10)
        with open(src, "a") as f:
            for _ in range(50):
                f.write(f"u0,1,{T0 + 10**7},40.71,-74.0\n")
                f.flush()
        appended.set()

    monkeypatch.setattr(sanity.HashingReader, "readinto", readinto)
    th = threading.Thread(target=append)
    th.start()
    try:
        with pytest.raises(DataError, match="changed while it was read"):
            prep(src, tmp_path / "p")
    finally:
        appended.set()
        th.join()
