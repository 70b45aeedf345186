"""Serving end to end on the shipped fsq-nyc data: prepare -> a run -> export -> predict / Predictor / HTTP
server from the raw records of 50 test users (docs/SERVING.md). One engine for the module (~60 s)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SHARED_DATA
from tests.integration.test_export_cli import _fake_run

ROOT = Path(__file__).resolve().parents[2]
NYC = SHARED_DATA / "fsq-nyc"
ORIGIN_MIN = int(np.datetime64("2012-04-03T18:00", "m").astype(np.int64))  # fsq-nyc t_min origin (DATA.md)
N_USERS = 50

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not NYC.is_dir(), reason=f"{NYC} not present"),
]


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nextlocmoe.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """data/, run/, engines/ of a debug model, and the raw records + test targets of 50 test users."""
    root = tmp_path_factory.mktemp("serving")
    data, run, eng = root / "data", root / "run", root / "engines"
    p = _cli("prepare", "--dataset", "fsq-nyc", "--source", str(NYC), "--out", str(data))
    assert p.returncode == 0, p.stderr[-2000:]
    _fake_run(data, run)
    cmd = [sys.executable, "export/export.py", "--run", str(run), "--out", str(eng), "--n-check", "8"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    users = np.load(data / "users.npy")
    rec_user, t_min = np.load(data / "records" / "user.npy"), np.load(data / "records" / "t_min.npy")
    samples = np.load(data / "samples_test.npy")
    chosen = np.unique(rec_user[samples])[:N_USERS]
    sel = np.flatnonzero(np.isin(rec_user[samples], chosen))  # positions in the test split
    r = samples[sel]
    tie = t_min[r] == t_min[r - 1]  # a record at the target's own minute: not "before" the query time
    raw, poi = np.load(NYC / "NYC.npy"), np.load(NYC / "NYC_POI.npy")
    rows = raw[np.isin(raw[:, 0], users[chosen])]
    ll = {int(v): (la, lo) for v, la, lo in poi}
    lines = ["user,venue,time,lat,lon"]
    for u, v, t in rows:  # the raw rows, times as ISO-8601 UTC; lat/lon from NYC_POI.npy
        iso = f"{np.datetime64(ORIGIN_MIN + int(t), 'm')}:00Z"
        lines.append(f"{u},{v},{iso},{ll[int(v)][0]!r},{ll[int(v)][1]!r}")
    (root / "records.csv").write_text("\n".join(lines) + "\n")
    q = ["user,time"] + [
        f"{users[rec_user[x]]},{np.datetime64(ORIGIN_MIN + int(t_min[x]), 'm')}:00Z" for x in r
    ]
    (root / "queries.csv").write_text("\n".join(q) + "\n")
    return {"root": root, "data": data, "run": run, "eng": eng, "sel": sel, "tie": tie}


def _evaluate_top10(built: dict) -> np.ndarray:
    """Top-10 location ids of ``evaluate``'s scored ranking (eager model on the store; ties: lower id)."""
    from nextlocmoe.data.store import TrajectoryDataset, collate
    from nextlocmoe.model.io import load_run

    _, model, _ = load_run(built["run"])
    ds = TrajectoryDataset(built["data"], "test", pointer=model.pointer_window)
    with torch.no_grad():
        pred, _ = model(collate(ds.get_batch(built["sel"])))
    s = pred.scores.float().numpy()
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=1)
    return np.load(built["data"] / "locations.npz")["id"][order[:, :10]]


def _predict(built: dict, eng: Path, out: Path) -> list[dict]:
    root = built["root"]
    p = _cli("predict", "--engine", str(eng), "--records", str(root / "records.csv"), "--lat-col", "lat",
             "--lon-col", "lon", "--at", str(root / "queries.csv"), "--top-k", "10",
             "--out", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_predict_from_raw_records_matches_evaluate_top10(built: dict) -> None:
    answers = _predict(built, built["eng"], built["root"] / "pred.jsonl")
    ref = _evaluate_top10(built)
    assert len(answers) == len(ref) == len(built["sel"])
    ok = ~built["tie"]
    assert ok.sum() >= 0.98 * len(ok)  # same-minute records (excluded: not before the query) are rare
    got = np.array([a["venues"] for a in answers])
    assert all(a["source"] == "model" and a["engine_version"] for a in answers)
    mismatch = np.flatnonzero((got[ok] != ref[ok]).any(axis=1))
    assert len(mismatch) == 0, f"{len(mismatch)} of {ok.sum()} targets differ, e.g. {got[ok][mismatch[:1]]}"
    assert all(np.all(np.diff(a["scores"]) <= 0) and max(a["scores"]) <= 0 for a in answers)  # log-probs


def test_featurizer_rebuilds_the_store_tensors_from_raw_records(built: dict) -> None:
    from nextlocmoe.data.store import TrajectoryDataset
    from nextlocmoe.serve.history import sequence
    from nextlocmoe.serve.predictor import Predictor

    p = Predictor(built["eng"])
    recs = [line.split(",") for line in (built["root"] / "records.csv").read_text().splitlines()[1:]]
    hists = p.histories([{"user": u, "venue": v, "time": t} for u, v, t, _, _ in recs])
    qs = [line.split(",") for line in (built["root"] / "queries.csv").read_text().splitlines()[1:]]
    ok = ~built["tie"]
    seqs = []
    for (u, t), keep in zip(qs, ok, strict=True):
        if keep:
            h, at = hists[u], int(np.datetime64(t.rstrip("Z"), "m").astype(np.int64))
            seqs.append(sequence(h, h.before(at), at, p.window))
    feats = p.features(seqs)
    store = TrajectoryDataset(built["data"], "test", pointer=p.P).get_batch(built["sel"][ok])
    for name in p.input_names:
        assert feats[name].dtype == store[name].dtype, name
        assert np.array_equal(feats[name], store[name]), name


def test_engine_folder_moved_without_data_or_run(built: dict, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "engines"
    shutil.copytree(built["eng"], moved)
    data_copy, run_copy = tmp_path / "data_kept", tmp_path / "run_kept"
    shutil.move(built["data"], data_copy)  # the data and the run are gone while the moved engine serves
    shutil.move(built["run"], run_copy)
    try:
        a = _predict(built, moved, tmp_path / "moved.jsonl")
        b = [json.loads(x) for x in (built["root"] / "pred.jsonl").read_text().splitlines()]
        assert [x["venues"] for x in a] == [x["venues"] for x in b]
        from nextlocmoe.serve.predictor import Predictor

        assert Predictor(moved, backend="torch").engine.version == a[0]["engine_version"]
    finally:
        shutil.move(data_copy, built["data"])
        shutil.move(run_copy, built["run"])


def test_torch_backend_agrees_with_onnxruntime(built: dict) -> None:
    from nextlocmoe.serve.predictor import Predictor

    recs = [line.split(",") for line in (built["root"] / "records.csv").read_text().splitlines()[1:200]]
    records = [{"user": u, "venue": v, "time": t} for u, v, t, _, _ in recs]
    at = "2013-03-01T12:00:00Z"
    a = Predictor(built["eng"]).predict(records, at=at, top_k=5)
    b = Predictor(built["eng"], backend="torch").predict(records, at=at, top_k=5)
    assert [x["venues"] for x in a] == [x["venues"] for x in b] and len(a) >= 1
    assert np.allclose([x["scores"] for x in a], [x["scores"] for x in b], atol=1e-4)


def test_engine_folder_errors_are_one_line(built: dict, tmp_path: Path) -> None:
    bad = tmp_path / "eng"
    shutil.copytree(built["eng"], bad)
    meta = json.loads((bad / "serving.json").read_text())
    meta["format_version"] = 99
    (bad / "serving.json").write_text(json.dumps(meta))
    p = _cli("predict", "--engine", str(bad), "--records", str(built["root"] / "records.csv"), "--at", "now")
    assert p.returncode == 2 and "format_version 99" in p.stderr and "Traceback" not in p.stderr
    (bad / "venues.npz").unlink()
    (bad / "serving.json").write_text(json.dumps({**meta, "format_version": 1}))
    p = _cli("predict", "--engine", str(bad), "--records", str(built["root"] / "records.csv"), "--at", "now")
    assert (
        p.returncode == 2 and "venues.npz: not found" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    )


@pytest.fixture(scope="module")
def server(built: dict):
    """``nextlocmoe serve``'s app on 127.0.0.1 (a free port), in a thread; stopped after the module."""
    import socket
    import threading
    import time

    import uvicorn

    from nextlocmoe.serve.predictor import Predictor
    from nextlocmoe.serve.server import ServerSettings, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(Predictor(built["eng"]), ServerSettings(max_batch=8, max_wait_ms=5.0))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(timeout=10)


def _http(base: str, path: str, body: object = None, raw: bytes | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _user_records(built: dict, n: int = 30) -> tuple[str, list[dict]]:
    rows = [line.split(",") for line in (built["root"] / "records.csv").read_text().splitlines()[1:]]
    user = rows[0][0]
    recs = [{"venue": v, "time": t} for u, v, t, _, _ in rows if u == user]
    return user, sorted(recs, key=lambda r: r["time"])[:n]


def test_server_events_then_predict_equals_predictor(built: dict, server: str) -> None:
    from nextlocmoe.serve.predictor import Predictor

    assert _http(server, "/healthz") == (200, {"status": "ok"})
    code, ready = _http(server, "/readyz")
    assert code == 200 and ready["ready"] and ready["backend"] == "onnxruntime"
    user, recs = _user_records(built)
    code, res = _http(server, "/events", {"user": user, "records": recs[:20]})
    assert code == 200 and res["added"] + res["duplicates"] == 20 and res["added"] >= 15
    n = res["added"]
    code, res = _http(server, "/events", {"user": user, "records": recs[20:]})
    assert code == 200 and res["stored"] == n + res["added"]
    at = "2013-03-01T12:00:00Z"
    code, ans = _http(server, "/predict", {"user": user, "at": at, "top_k": 5})
    ref = Predictor(built["eng"]).predict([{"user": user, **r} for r in recs], at=at, top_k=5)[0]
    assert code == 200 and ans["venues"] == ref["venues"] and ans["source"] == "model"
    code, stateless = _http(server, "/predict", {"user": "x", "at": at, "top_k": 5, "records": recs})
    assert code == 200 and stateless["venues"] == ref["venues"]
    code, cold = _http(server, "/predict", {"user": "never-seen", "at": at})
    assert code == 200 and cold["source"] == "popularity" and "cold start" in cold["note"]
    assert len(cold["venues"]) == 10


def test_server_bad_requests_get_4xx_with_a_reason(built: dict, server: str) -> None:
    user, recs = _user_records(built, 10)
    _http(server, "/events", {"user": "bad-u", "records": recs})
    v0, old, nan = recs[0]["venue"], "2012-01-01T00:00:00Z", b'"lat": NaN, "lon": 1.0}]}'
    cases = [
        ("/predict", None, b'{"user": "a", "at": ', 400, "malformed JSON"),
        ("/events", {"user": "a", "records": [{"venue": "no-such", "time": 0}]}, None, 422, "no lat/lon"),
        ("/events", {"user": "a", "records": [{"venue": "zz", "time": 0, "lat": 95.0, "lon": 1.0}]}, None,
         422, "bad coordinates"),
        ("/events", None, b'{"user": "a", "records": [{"venue": "zz", "time": 0, ' + nan, 422,
         "bad coordinates"),
        ("/events", {"user": "bad-u", "records": [{"venue": v0, "time": old}]}, None, 409, "time order"),
        ("/events", {"user": "a", "records": [{"venue": v0, "time": "nope"}]}, None, 422, "cannot parse"),
        ("/predict", {"user": "bad-u", "at": old}, None, 409, "before the user's last"),
        ("/predict", {"user": "bad-u", "at": "2013-01-01T00:00:00Z", "top_k": 500}, None, 422, "top_k"),
        ("/predict", {"at": 0}, None, 422, "user"),
    ]  # fmt: skip
    for path, body, raw, code, reason in cases:
        got, res = _http(server, path, body, raw)
        assert (got, reason in res.get("error", "")) == (code, True), (path, body, raw, got, res)
        assert "\n" not in res["error"]
    code, m = _http(server, "/metrics")
    assert code == 200 and m["requests"]["/predict 400"] >= 1 and m["predict_latency"]["p50_ms"] > 0


def test_serve_cli_from_a_moved_engine_under_a_bounded_loopback_load(built: dict, tmp_path: Path) -> None:
    """``nextlocmoe serve`` (subprocess, 127.0.0.1) on a copy of the engine with the data folder moved away:
    2 clients for 2 s (export/e2e.py load_test, as bench's --load-clients runs it)."""
    from export.e2e import load_test, synthetic_users
    from nextlocmoe.serve.engine import load_engine

    moved = tmp_path / "copy" / "engines"
    shutil.copytree(built["eng"], moved)
    away = tmp_path / "data_away"
    shutil.move(built["data"], away)
    try:
        users = synthetic_users(load_engine(moved).venues, 8, 256)
        res = load_test(moved, users, clients=2, seconds=2.0)
    finally:
        shutil.move(away, built["data"])
    assert res["errors"] == 0 and res["requests"] > 10 and res["host"] == "127.0.0.1"
    assert res["p99_ms"] >= res["p50_ms"] > 0 and sum(res["server_batch_sizes"].values()) > 0


def test_predict_counts_unusable_rows_and_keeps_unknown_venues_with_coordinates(
    built: dict, tmp_path: Path
) -> None:
    rows = (built["root"] / "records.csv").read_text().splitlines()
    user = rows[1].split(",")[0]
    mine = [r for r in rows[1:] if r.split(",")[0] == user][:30]
    extra = [
        f"{user},brand-new-cafe,2013-02-01T10:00:00Z,40.7301,-73.9901",  # unknown, with coordinates: kept
        f"{user},another-new-place,2013-02-01T11:00:00Z,,",  # unknown, no coordinates: unknown_venue
        f"{user},{mine[0].split(',')[1]},2013-02-01T12:00:00Z,nan,-73.99",  # known: the engine's coordinates
        f"{user},{mine[0].split(',')[1]},not-a-time,40.7,-73.99",  # unparsable_time
    ]
    (tmp_path / "r.csv").write_text("\n".join([rows[0], *mine, *extra]) + "\n")
    out = tmp_path / "p.jsonl"
    p = _cli("predict", "--engine", str(built["eng"]), "--records", str(tmp_path / "r.csv"), "--lat-col",
             "lat", "--lon-col", "lon", "--at", "2013-02-01T13:00:00Z", "--out", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stderr.strip().splitlines()[-1].removeprefix("predict: "))
    acct = summary["records"]
    assert acct["dropped"] == {"unknown_venue": 1, "unparsable_time": 1} and acct["kept"] == len(mine) + 2
    assert "r.csv:" in acct["first"]["unknown_venue"] and "not-a-time" in acct["first"]["unparsable_time"]
    ans = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(ans) == 1 and ans[0]["source"] == "model" and len(ans[0]["venues"]) == 10
    p = _cli("predict", "--engine", str(built["eng"]), "--records", str(tmp_path / "r.csv"), "--top-k", "99")
    assert (
        p.returncode == 2 and "top_k must be an integer in 1..20" in p.stderr and "Traceback" not in p.stderr
    )
