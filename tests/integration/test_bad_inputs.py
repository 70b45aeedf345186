"""The bad-input matrix (docs/DATA.md "Bad inputs"): every command a user runs, fed broken or unusual input
through its real entry (subprocess of the `nextlocmoe` script, train/train.py, export/export.py,
export/bench.py). Each case asserts the exit status, that stderr has no traceback, that an error is one
line naming the place (file, line, field, key, checkpoint step), and that nothing was left behind that a
later run would trust (no manifest.json / report / half-written folder). Success cases are documented
behaviour (e.g. rows dropped and counted, a previous prepare output replaced)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from tests.integration import bad_inputs_cases as bic
from tests.unit.test_checkpoint_payload import Payload

pytestmark = [pytest.mark.integration]
ROOT = bic.ROOT
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
PROGRAMS = {
    "nextlocmoe": [str(Path(sys.executable).with_name("nextlocmoe"))]
    if Path(sys.executable).with_name("nextlocmoe").is_file()
    else [sys.executable, "-m", "nextlocmoe.cli"],
    "train": [sys.executable, "train/train.py"],
    "export": [sys.executable, "export/export.py"],
    "bench": [sys.executable, "export/bench.py"],
}
PREP = ["prepare", "--history", "4", "--current", "2"]  # a sample needs 2 + 1 + 1 = 4 records per user
TRAIN = ["--config", "configs/debug.yaml", "--deepspeed", "ds_configs/zero2.json"]


@dataclass
class Case:
    prog: str
    argv: list[str]
    rc: int = 2
    says: tuple[str, ...] = ()  # in the one-line error (rc != 0) or in stdout + stderr (rc == 0)
    after: Callable[[], None] | None = None  # what must (not) be on disk afterwards
    files: list[Path] = field(default_factory=list)  # must not exist afterwards


CASES: dict[str, Callable[[Path, Callable[[], Path]], Case]] = {}


def case(fn: Callable[[Path, Callable[[], Path]], Case]) -> Callable:
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


def _csv_case(tmp: Path, lines: list[str], rc: int, says: tuple, *extra: str, **kw) -> Case:
    src = bic.write_csv(tmp / "checkins.csv", lines, **kw)
    out = tmp / "out"
    return Case("nextlocmoe", [*PREP, "--dataset", "csv", "--source", str(src), "--out", str(out),
                               *bic.CSV_ARGS, *extra], rc, says, files=[] if rc == 0 else [out])  # fmt: skip


def manifest(tmp: Path) -> dict:
    return json.loads((tmp / "out" / "manifest.json").read_text())


# ---- prepare -------------------------------------------------------------------------------------------
@case
def case_prepare_empty_file(tmp: Path, run) -> Case:
    (tmp / "checkins.csv").write_text("")
    out = tmp / "out"
    argv = [*PREP, "--dataset", "csv", "--source", str(tmp / "checkins.csv"), "--out", str(out)]
    argv += bic.CSV_ARGS
    return Case("nextlocmoe", argv, 2, ("checkins.csv", "empty file"), files=[out])


@case
def case_prepare_header_only(tmp: Path, run) -> Case:
    return _csv_case(tmp, [], 2, ("checkins.csv: no usable rows of 0", "no data rows"))


@case
def case_prepare_nan_coordinates(tmp: Path, run) -> Case:
    lines = bic.set_field(bic.csv_rows(), 3, "nan", slice(None))
    return _csv_case(tmp, lines, 2, ("no usable rows of 36", "36 dropped as bad_coordinate",
                                     "checkins.csv:2: lat='nan'"))  # fmt: skip


@case
def case_prepare_out_of_range_coordinates(tmp: Path, run) -> Case:
    c = _csv_case(tmp, bic.set_field(bic.csv_rows(), 3, "95.0", [0, 5, 9]), 0, ("33 kept",))

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
    c = _csv_case(tmp, lines, 0, ("36 kept",), "--timezone", "America/New_York")

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
    return _csv_case(tmp, bic.csv_rows(), 2, says, "--timezone", "Mars/Olympus")


@case
def case_prepare_unsorted_rows(tmp: Path, run) -> Case:
    lines = bic.csv_rows()
    c = _csv_case(tmp, lines[::-1], 0, ("36 kept",))

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
    return _csv_case(tmp, lines, 2, ("user_too_short", "fewer than 4 records", "user 'u0' with 1 (of 5"))


@case
def case_prepare_non_utf8_bytes(tmp: Path, run) -> Case:
    src = bic.write_csv(tmp / "checkins.csv", bic.csv_rows())
    raw = src.read_bytes().split(b"\n")
    raw[4] = raw[4].replace(b"cat", b"caf\xe9", 1)
    src.write_bytes(b"\n".join(raw))
    c = _csv_case(tmp, [], 2, ("checkins.csv: line 5, byte 0xe9", "not UTF-8"))
    src.write_bytes(b"\n".join(raw))  # _csv_case rewrote it
    return c


@case
def case_prepare_bom_crlf_quoted(tmp: Path, run) -> Case:
    """A spreadsheet export: UTF-8 BOM, CRLF, a quoted venue name holding a comma and a quote."""
    lines = bic.set_field(bic.csv_rows(), 1, '"Joe\'s ""Pizza"", 5th Ave"', [0, 4])
    c = _csv_case(tmp, lines, 0, ("36 kept",), newline="\r\n")
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
    return _csv_case(tmp, lines, 2, ("36 dropped as unparsable_time", "checkins.csv:2: time='yesterday'"))


@case
def case_prepare_missing_column(tmp: Path, run) -> Case:
    header = bic.CSV_HEADER.replace("venue", "place")
    return _csv_case(tmp, bic.csv_rows(), 2, ("checkins.csv: line 1", "['venue']"), header=header)


@case
def case_prepare_truncated_last_line(tmp: Path, run) -> Case:
    lines = bic.csv_rows()
    lines[-1] = lines[-1][:20]
    c = _csv_case(tmp, lines, 0, ("35 kept",))
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
    c = _csv_case(tmp, bic.csv_rows(), 2, ("--out", "not empty", "'notes.txt'", "no manifest.json"))
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
    c = _csv_case(tmp, bic.csv_rows(), 0, ("36 kept",))

    def after() -> None:
        assert manifest(tmp)["input_rows"] == 36 and not (tmp / "out" / "stale.txt").exists()
        assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []

    c.after = after
    return c


@case
def case_prepare_missing_source(tmp: Path, run) -> Case:
    argv = [*PREP, "--dataset", "fsq-nyc", "--source", str(tmp / "nowhere"), "--out", str(tmp / "out")]
    return Case("nextlocmoe", argv, 2, ("nowhere: source not found",), files=[tmp / "out"])


# ---- evaluate / explain / tokenize ---------------------------------------------------------------------
def _damaged(run: Path, how: str) -> Path:
    f = run / "checkpoints" / "step2" / "mp_rank_00_model_states.pt"
    if how == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    else:
        import torch

        torch.save({"module": {}, "client_state": Payload(run / "pwned")}, f)
    return run


@case
def case_evaluate_truncated_checkpoint(tmp: Path, run) -> Case:
    r = _damaged(run(), "truncate")
    argv = ["evaluate", "--run", str(r), "--max-samples", "16", "--quiet", "--out", str(tmp / "eval.json")]
    says = ("checkpoint step2 file", "mp_rank_00_model_states.pt unreadable:",
            "newest readable checkpoint: step1", "--fallback-checkpoint")  # fmt: skip
    return Case("nextlocmoe", argv, 2, says, files=[tmp / "eval.json"])


@case
def case_evaluate_fallback_checkpoint(tmp: Path, run) -> Case:
    r = _damaged(run(), "truncate")
    argv = ["evaluate", "--run", str(r), "--max-samples", "16", "--quiet", "--out", str(tmp / "eval.json"),
            "--fallback-checkpoint"]  # fmt: skip

    def after() -> None:
        rep = json.loads((tmp / "eval.json").read_text())
        assert rep["n"] == 16 and 0.0 <= rep["hit@10"] <= 1.0

    return Case("nextlocmoe", argv, 0, ("falling back to the newest readable checkpoint", "step1"), after)


@case
def case_evaluate_malicious_checkpoint(tmp: Path, run) -> Case:
    r = _damaged(run(), "payload")
    argv = ["evaluate", "--run", str(r), "--max-samples", "16", "--quiet"]
    says = ("checkpoint step2 file", "refused", "builtins.exec")
    return Case("nextlocmoe", argv, 2, says, files=[r / "pwned"])


@case
def case_evaluate_not_a_run(tmp: Path, run) -> Case:
    (tmp / "empty").mkdir()
    return Case("nextlocmoe", ["evaluate", "--run", str(tmp / "empty")], 2, ("empty/config.yaml: not found",))


@case
def case_evaluate_baselines_not_prepared(tmp: Path, run) -> Case:
    (tmp / "empty").mkdir()
    argv = ["evaluate", "--baselines-only", "--data", str(tmp / "empty"), "--out", str(tmp / "b.json")]
    return Case("nextlocmoe", argv, 2, ("empty/manifest.json: not found",), files=[tmp / "b.json"])


@case
def case_explain_truncated_checkpoint(tmp: Path, run) -> Case:
    r = _damaged(run(), "truncate")
    argv = ["explain", "--run", str(r), "--out", str(tmp / "rep"), "--max-samples", "16"]
    says = ("checkpoint step2 file", "unreadable")
    return Case("nextlocmoe", argv, 2, says, files=[tmp / "rep" / "summary.json"])


@case
def case_tokenize_bad_levels(tmp: Path, run) -> Case:
    return Case("nextlocmoe", ["tokenize", "--data", str(tmp), "--levels", "0"], 2, ("--levels >= 1",))


@case
def case_tokenize_not_prepared(tmp: Path, run) -> Case:
    return Case("nextlocmoe", ["tokenize", "--data", str(tmp)], 2, ("manifest.json: not found",),
                files=[tmp / "location_codes.json"])  # fmt: skip


# ---- train (errors found before any process group starts: one process, no launcher) --------------------
@case
def case_train_unknown_config_key(tmp: Path, run) -> Case:
    return Case("train", [*TRAIN, "train.foo=1"], 2, ("unknown config key(s) ['train.foo']",))


@case
def case_train_wrong_value_type(tmp: Path, run) -> Case:
    return Case("train", [*TRAIN, "train.steps=abc"], 2, ("train.steps", "'abc'"))


@case
def case_train_ep_size_not_dividing_experts(tmp: Path, run) -> Case:
    return Case("train", [*TRAIN, "train.ep_size=3"], 2, ("ep_size", "(4)", "(3)"))


@case
def case_train_broken_ds_config_json(tmp: Path, run) -> Case:
    (tmp / "bad.json").write_text('{"zero_optimization": {"stage": 2,}')
    argv = ["--config", "configs/debug.yaml", "--deepspeed", str(tmp / "bad.json")]
    return Case("train", argv, 2, ("bad.json: invalid JSON", "line 1 column"))


@case
def case_train_broken_config_yaml(tmp: Path, run) -> Case:
    (tmp / "bad.yaml").write_text("model: {flavour: debug\n")
    argv = ["--config", str(tmp / "bad.yaml"), "--deepspeed", "ds_configs/zero2.json"]
    return Case("train", argv, 2, ("bad.yaml: not valid YAML", "line 1, column 8"))


# ---- export / bench ------------------------------------------------------------------------------------
@case
def case_export_truncated_checkpoint(tmp: Path, run) -> Case:
    r = _damaged(run(), "truncate")
    says = ("checkpoint step2 file", "unreadable", "newest readable checkpoint: step1")
    return Case("export", ["--run", str(r), "--out", str(tmp / "eng")], 2, says, files=[tmp / "eng"])


@case
def case_bench_input_wrong_dtype(tmp: Path, run) -> Case:
    eng = bic.tiny_engine(tmp, x_dtype="float64")
    argv = ["--engines", str(eng), "--backends", "onnxruntime", "--out", str(tmp / "b.json")]
    return Case("bench", argv, 2, ("sample_inputs.npz", "input 'x': dtype float64, expected float32"),
                files=[tmp / "b.json"])  # fmt: skip


@case
def case_bench_input_wrong_shape(tmp: Path, run) -> Case:
    eng = bic.tiny_engine(tmp, x_shape=(4, 3, 1))
    argv = ["--engines", str(eng), "--backends", "torch,onnxruntime", "--out", str(tmp / "b.json")]
    return Case("bench", argv, 2, ("sample_inputs.npz", "input 'x'", "rank 3"), files=[tmp / "b.json"])


@case
def case_bench_not_an_engine(tmp: Path, run) -> Case:
    argv = ["--engines", str(tmp), "--out", str(tmp / "b.json")]
    return Case("bench", argv, 2, ("not an engine folder (no frozen.json",), files=[tmp / "b.json"])


# ---- the runner ----------------------------------------------------------------------------------------
WORKERS = max(1, min(4, os.cpu_count() or 1))  # the cases are independent processes: run them side by side


def _launch(c: Case) -> subprocess.CompletedProcess:
    return subprocess.run([*PROGRAMS[c.prog], *c.argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Set up every selected case, launch them all (WORKERS at a time), return name -> (tmp, case, proc)."""
    names = sorted({it.callspec.params["name"] for it in request.session.items
                    if getattr(it, "originalname", "") == "test_bad_input"})  # fmt: skip
    base: list[Path] = []

    def run_copy(tmp: Path) -> Path:
        if not base:
            base.append(bic.make_run(tmp_path_factory.mktemp("base_run")))
        shutil.copytree(base[0], tmp / "run_copy")
        return tmp / "run_copy"

    cases = {}
    for name in names:
        tmp = tmp_path_factory.mktemp(name)
        cases[name] = (tmp, CASES[name](tmp, lambda tmp=tmp: run_copy(tmp)))
    with ThreadPoolExecutor(WORKERS) as pool:
        procs = {name: pool.submit(_launch, c) for name, (_, c) in cases.items()}
        return {name: (*cases[name], procs[name].result()) for name in names}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, outcomes: dict) -> None:
    tmp, c, p = outcomes[name]
    detail = f"rc={p.returncode}\nstdout: {p.stdout[-1500:]}\nstderr: {p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, detail
    assert p.returncode == c.rc, detail
    if c.rc:
        errors = [ln for ln in p.stderr.splitlines() if "error:" in ln]
        assert len(errors) == 1, detail
        print(f"[{name}] {errors[0]}")  # the message as users see it (pytest -s; docs/DATA.md table)
        for s in c.says:
            assert s in errors[0], f"{s!r} not in the error line {errors[0]!r}"
    else:
        for s in c.says:
            assert s in p.stdout + p.stderr, f"{s!r} not in the output\n{detail}"
    for f in c.files:
        assert not f.exists(), f"{f} left behind"
    if c.rc:  # a failed prepare leaves no temporary folder beside --out
        assert not [q.name for q in tmp.iterdir() if ".partial-" in q.name]
    if c.after is not None:
        assert c.after() is not False


def test_matrix_size() -> None:
    """The matrix covers every command (docs/DATA.md lists the same cases)."""
    assert len(CASES) >= 25
    assert {n.split("_")[0] for n in CASES} >= {"prepare", "evaluate", "explain", "tokenize", "train",
                                                "export", "bench"}  # fmt: skip
