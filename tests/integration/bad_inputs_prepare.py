"""Bad-input matrix: ``prepare`` cases (docs/DATA.md "Bad inputs")."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np

from tests.integration import bad_inputs_cases as bic
from tests.integration.bad_inputs_registry import PREP, Case, case, csv_case, manifest


@case
def case_prepare_empty_file(tmp: Path, run) -> Case:
    (tmp / "checkins.csv").write_text("")
    out = tmp / "out"
    argv = [*PREP, "--dataset", "csv", "--source", str(tmp / "checkins.csv"), "--out", str(out)]
    argv += bic.CSV_ARGS
    return Case("nextlocmoe", argv, 2, ("checkins.csv", "empty file"), files=[out])


@case
def case_prepare_header_only(tmp: Path, run) -> Case:
    return csv_case(tmp, [], 2, ("checkins.csv: no usable rows of 0", "no data rows"))


@case
def case_prepare_nan_coordinates(tmp: Path, run) -> Case:
    lines = bic.set_field(bic.csv_rows(), 3, "nan", slice(None))
    return csv_case(tmp, lines, 2, ("no usable rows of 36", "36 dropped as bad_coordinate",
                                     "checkins.csv:2: lat='nan'"))  # fmt: skip


@case
def case_prepare_out_of_range_coordinates(tmp: Path, run) -> Case:
    c = csv_case(tmp, bic.set_field(bic.csv_rows(), 3, "95.0", [0, 5, 9]), 0, ("33 kept",))

    def after() -> None:
        m = manifest(tmp)
        assert m["dropped"]["bad_coordinate"] == 3 and m["input_rows"] == 36
        assert m["kept_rows"] + sum(m["dropped"].values()) == 36
        assert m["drop_first_example"]["bad_coordinate"] == "checkins.csv:2: lat='95.0', lon='-74.0000'"

    c.after = after
    return c


@case
def case_prepare_time_zones(tmp: Path, run) -> Case:
    """ISO times with a +02:00 offset, weekday/hour asked in New York time (EDT in April: UTC-4)."""
    lines = bic.csv_rows(tz="+02:00")
    c = csv_case(tmp, lines, 0, ("36 kept",), "--timezone", "America/New_York")

    def after() -> None:
        from datetime import datetime

        want = sorted(datetime.fromisoformat(ln.split(",")[2]).astimezone(ZoneInfo("America/New_York")).hour
                      for ln in lines)  # fmt: skip
        assert sorted(np.load(tmp / "out" / "records" / "hour.npy").tolist()) == want
        assert "America/New_York" in manifest(tmp)["time_origin"]

    c.after = after
    return c


@case
def case_prepare_unknown_time_zone(tmp: Path, run) -> Case:
    says = ("unknown time zone 'Mars/Olympus'",)
    return csv_case(tmp, bic.csv_rows(), 2, says, "--timezone", "Mars/Olympus")


@case
def case_prepare_unsorted_rows(tmp: Path, run) -> Case:
    lines = bic.csv_rows()
    c = csv_case(tmp, lines[::-1], 0, ("36 kept",))

    def after() -> None:
        from nextlocmoe.data.csvsource import CsvSpec
        from nextlocmoe.data.prepare import prepare

        spec = CsvSpec(time_col="time", lat_col="lat", lon_col="lon", category_col="category")
        prepare("csv", bic.write_csv(tmp / "sorted.csv", lines), tmp / "ref", 4, 2, csv_spec=spec)
        for col in ("user", "loc", "t_min", "split"):
            got, ref = (np.load(d / "records" / f"{col}.npy") for d in (tmp / "out", tmp / "ref"))
            assert np.array_equal(got, ref), col

    c.after = after
    return c


@case
def case_prepare_one_record_users(tmp: Path, run) -> Case:
    lines = [bic.csv_rows(n_users=1, per_user=1)[0].replace("u0", f"u{i}", 1) for i in range(5)]
    says = ("user_too_short", "fewer than 4 distinct records", "user 'u0' with 1 (of 5")
    return csv_case(tmp, lines, 2, says)


@case
def case_prepare_all_duplicates(tmp: Path, run) -> Case:
    """Five copies of one check-in: 4 duplicates, the one left is too short (was a numpy reduction error)."""
    says = ("user_too_short or duplicate (4 duplicates)", "user 'u0' with 1 (of 1 users)")
    return csv_case(tmp, bic.csv_rows(n_users=1, per_user=1) * 5, 2, says)


@case
def case_prepare_non_utf8_bytes(tmp: Path, run) -> Case:
    src = bic.write_csv(tmp / "checkins.csv", bic.csv_rows())
    raw = src.read_bytes().split(b"\n")
    raw[4] = raw[4].replace(b"cat", b"caf\xe9", 1)
    src.write_bytes(b"\n".join(raw))
    c = csv_case(tmp, [], 2, ("checkins.csv: line 5, byte 0xe9", "not UTF-8"))
    src.write_bytes(b"\n".join(raw))  # csv_case rewrote it
    return c


@case
def case_prepare_bom_crlf_quoted(tmp: Path, run) -> Case:
    """A spreadsheet export: UTF-8 BOM, CRLF, a quoted venue name holding a comma and a quote."""
    lines = bic.set_field(bic.csv_rows(), 1, '"Joe\'s ""Pizza"", 5th Ave"', [0, 4])
    c = csv_case(tmp, lines, 0, ("36 kept",), newline="\r\n")
    src = tmp / "checkins.csv"
    src.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())

    def after() -> None:
        ids = np.load(tmp / "out" / "locations.npz")["id"].tolist()
        assert 'Joe\'s "Pizza", 5th Ave' in ids and manifest(tmp)["dropped"].get("malformed_row", 0) == 0

    c.after = after
    return c


@case
def case_prepare_unparsable_times(tmp: Path, run) -> Case:
    lines = bic.set_field(bic.csv_rows(), 2, "yesterday", slice(None))
    return csv_case(tmp, lines, 2, ("36 dropped as unparsable_time", "checkins.csv:2: time='yesterday'"))


@case
def case_prepare_missing_column(tmp: Path, run) -> Case:
    header = bic.CSV_HEADER.replace("venue", "place")
    return csv_case(tmp, bic.csv_rows(), 2, ("checkins.csv: line 1", "['venue']"), header=header)


@case
def case_prepare_truncated_last_line(tmp: Path, run) -> Case:
    lines = bic.csv_rows()
    lines[-1] = lines[-1][:20]
    c = csv_case(tmp, lines, 0, ("35 kept",))
    c.after = lambda: manifest(tmp)["drop_first_example"]["malformed_row"].startswith("checkins.csv:37:")
    return c


@case
def case_prepare_hex_location_ids(tmp: Path, run) -> Case:
    src = bic.hex_llmmob(tmp / "hex")
    argv = [*PREP, "--dataset", "llmmob-fsq-nyc", "--source", str(src), "--out", str(tmp / "out"),
            "--reference-poi", str(tmp / "absent.npy")]  # fmt: skip
    says = ("66 rows, 66 kept", "coordinates: normalised source units", "no reference venue table at")

    def after() -> None:
        m = manifest(tmp)
        assert m["kept_rows"] + sum(m["dropped"].values()) == m["input_rows"] == 66
        assert m["coordinate_units"] == "normalised" and "absent.npy" in m["coordinate_system"]
        ids = np.load(tmp / "out" / "locations.npz")["id"]
        assert ids.dtype.kind == "U" and all(len(i) == 24 for i in ids)

    return Case("nextlocmoe", argv, 0, says, after)


@case
def case_prepare_llmmob_empty_ids(tmp: Path, run) -> Case:
    src = bic.make_llmmob(tmp / "llm", "nyc")
    for f in src.glob("*.csv"):
        lines = f.read_text().splitlines()
        f.write_text("\n".join([lines[0], *bic.set_field(lines[1:], 2, "", slice(None))]) + "\n")
    argv = [*PREP, "--dataset", "llmmob-fsq-nyc", "--source", str(src), "--out", str(tmp / "out")]
    says = ("40 dropped as missing_field", "foursquare_train.csv:2: location_id=''")
    return Case("nextlocmoe", argv, 2, says, files=[tmp / "out"])


def _fsq_case(tmp: Path, checkins, says: tuple) -> Case:
    src = bic.fsq_with(tmp, checkins)
    argv = [*PREP, "--dataset", "fsq-nyc", "--source", str(src), "--out", str(tmp / "out")]
    return Case("nextlocmoe", argv, 2, says, files=[tmp / "out"])


@case
def case_prepare_npy_wrong_dtype(tmp: Path, run) -> Case:
    return _fsq_case(tmp, np.zeros((10, 3), dtype=np.float64), ("NYC.npy: expected dtype kind", "float64"))


@case
def case_prepare_npy_wrong_shape(tmp: Path, run) -> Case:
    return _fsq_case(tmp, np.zeros((10, 2), dtype=np.int32), ("NYC.npy: expected a 2-D array", "(10, 2)"))


@case
def case_prepare_npy_not_npy(tmp: Path, run) -> Case:
    return _fsq_case(tmp, b"garbage, not a .npy", ("NYC.npy: not a .npy file (no NumPy header",))


@case
def case_prepare_npy_pickled_objects(tmp: Path, run) -> Case:
    objects = np.array([[{"a": 1}] * 3], dtype=object)
    return _fsq_case(tmp, objects, ("NYC.npy: holds pickled Python objects",))


@case
def case_prepare_out_not_empty(tmp: Path, run) -> Case:
    c = csv_case(tmp, bic.csv_rows(), 2, ("--out", "not empty", "'notes.txt'", "no manifest.json"))
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    c.files = [tmp / "out" / "manifest.json"]
    c.after = lambda: (tmp / "out" / "notes.txt").read_text() == "mine"
    return c


@case
def case_prepare_out_previous_output(tmp: Path, run) -> Case:
    """Re-running prepare into its own earlier output replaces it whole (documented), no leftovers."""
    from nextlocmoe.data.csvsource import CsvSpec
    from nextlocmoe.data.prepare import prepare

    spec = CsvSpec(time_col="time", lat_col="lat", lon_col="lon", category_col="category")
    prepare("csv", bic.write_csv(tmp / "old.csv", bic.csv_rows(n_users=4)), tmp / "out", 4, 2, csv_spec=spec)
    (tmp / "out" / "stale.txt").write_text("from the old data")
    c = csv_case(tmp, bic.csv_rows(), 0, ("36 kept",))

    def after() -> None:
        assert manifest(tmp)["input_rows"] == 36 and not (tmp / "out" / "stale.txt").exists()
        assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []

    c.after = after
    return c


@case
def case_prepare_missing_source(tmp: Path, run) -> Case:
    argv = [*PREP, "--dataset", "fsq-nyc", "--source", str(tmp / "nowhere"), "--out", str(tmp / "out")]
    return Case("nextlocmoe", argv, 2, ("nowhere: source not found",), files=[tmp / "out"])
