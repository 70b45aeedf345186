"""Text ids (Foursquare hex venue ids, names), spreadsheet CSVs (BOM, CRLF, quotes), drop examples naming
file:line, field and value, and the coordinate-system line of the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nextlocmoe.data.parsing import DataError, ids_as_int_if_all, read_csv_columns
from nextlocmoe.data.prepare import prepare
from nextlocmoe.data.sources import read_llmmob

HEX = ["4b0587a6f964a5203e9e22e3", "4a9e6f5df964a520c93920e3", "3fd66200f964a52023e41ee3"]


@pytest.mark.parametrize(
    ("ids", "as_int"),
    [
        (["12", "3", "5.0"], [12, 3, 5]),  # integers (numeric order of dense ids)
        (["7", "07"], None),  # would merge two distinct ids: stay text
        (["12", "12.0"], None),
        (HEX[:2], None),
        (["1e5", "2"], None),  # a float-looking string is not an integer id
        (["123456789012345678901234"], None),  # beyond int64
    ],
)
def test_ids_as_int_if_all(ids: list[str], as_int: list[int] | None) -> None:
    got = ids_as_int_if_all(np.array(ids))
    if as_int is None:
        assert got.dtype.kind == "U" and got.tolist() == ids
    else:
        assert got.dtype == np.int64 and got.tolist() == as_int


def _hexify(src: Path) -> None:
    for f in src.glob("*.csv"):
        lines = f.read_text().splitlines()
        rows = [ln.split(",") for ln in lines[1:]]
        for r in rows:
            r[2] = HEX[int(r[2]) % 3] + r[2]  # 5 distinct text ids
        f.write_text("\n".join([lines[0]] + [",".join(r) for r in rows]) + "\n")


def test_llmmob_hex_location_ids_kept(llmmob_nyc_dir: Path, tmp_path: Path) -> None:
    """Before: every row 'missing_field' and a numpy error. Now every row is kept, ids keep their text."""
    _hexify(llmmob_nyc_dir)
    t = read_llmmob(llmmob_nyc_dir, "llmmob-fsq-nyc")
    assert len(t) == t.input_rows == 40 and sum(t.dropped.values()) == 0
    assert t.venue.dtype.kind == "U" and t.user.dtype == np.int64
    m = prepare("llmmob-fsq-nyc", llmmob_nyc_dir, tmp_path / "out", 4, 2, reference_poi=tmp_path / "no.npy")
    ids = np.load(tmp_path / "out" / "locations.npz")["id"]
    assert m["locations"] == 5 and all(i[:24] in HEX for i in ids)
    assert m["coordinate_system"] == (
        f"normalised source units [-1, 1], not metres (no reference venue table at {tmp_path / 'no.npy'})"
    )


def test_csv_bom_crlf_quotes(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_bytes(b'\xef\xbb\xbf user ,venue\r\nu1,"a, ""b"""\r\n\r\nu2,c\r\n')
    c = read_csv_columns(p, ["user", "venue"])
    assert c.header == ["user", "venue"] and c.n_rows == 2 and c.n_malformed == 0
    assert c.cols["venue"].tolist() == ['a, "b"', "c"] and c.lines.tolist() == [2, 4]


def test_csv_not_utf8_names_line_and_byte(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_bytes(b"user,venue\nu1,a\nu2,caf\xe9\n")
    with pytest.raises(DataError, match=r"x.csv: line 3, byte 0xe9 at column 7: not UTF-8"):
        read_csv_columns(p, ["user", "venue"])


def test_all_rows_dropped_names_reason_and_first_example(llmmob_nyc_dir: Path, tmp_path: Path) -> None:
    for f in llmmob_nyc_dir.glob("*.csv"):
        lines = f.read_text().splitlines()
        f.write_text("\n".join([lines[0]] + [ln.replace(",", ",x", 3) for ln in lines[1:]]) + "\n")
    with pytest.raises(DataError) as e:
        prepare("llmmob-fsq-nyc", llmmob_nyc_dir, tmp_path / "out", 4, 2)
    msg = str(e.value)
    assert "no usable rows of 40: 40 dropped as bad_coordinate" in msg
    assert "first at foursquare_train.csv:2: latitude='x" in msg
    assert not (tmp_path / "out").exists()


def test_coordinate_system_recovered_and_fsq(tmp_path: Path, prepared_fsq: Path) -> None:
    import json

    m = json.loads((prepared_fsq / "manifest.json").read_text())
    assert m["coordinate_system"] == "WGS84 from NYC_POI.npy venue table; x/y Web-Mercator metres"
