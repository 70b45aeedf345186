"""End-to-end latency for ``export/bench.py`` (docs/SERVING.md "Measured"): what a request costs, not only
the graph.

- ``e2e_rows``: per backend and batch, one request = B users' queries -> ranked original venue ids:
  ``path="state"`` featurize (``featurize.sample_features`` from each user's held state of max(P, H + C)
  records) + engine + decode (what ``POST /predict`` does behind HTTP); ``path="raw"`` the request carries
  each user's last P raw records (venue id, ISO time): parse + validate + featurize + engine + decode
  (a stateless ``POST /predict`` with ``records``). Same row keys as the graph rows plus ``path``, and
  ``graph_p50_ms`` / ``over_graph``: the graph alone on the same batch, timed round-robin with the requests.
- ``load_test``: ``nextlocmoe serve`` started as a subprocess on 127.0.0.1, N client threads with keep-alive
  connections POST /predict for a fixed duration; client-side p50/p99 and requests/s, the server's batch
  sizes. Bounded: a fixed duration, loopback only, the server stopped at the end.

Requests are synthetic users (fixed seed): venues drawn by the engine's training visit counts, gaps of
10 min to 12 h, so every window is full (P records), the costliest case for the featurizer.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.timing import row

log = logging.getLogger("bench")
T0_MIN = 22_000_000  # 2011-10-30 (minutes since 1970), any fixed start


def synthetic_users(venues: dict[str, np.ndarray], n_users: int, n_records: int, seed: int = 0) -> list[dict]:
    """[{user, records: [{venue, time}], at}] with time-ordered records and a query 1 h after the last."""
    rng = np.random.default_rng(seed)
    prob = venues["count"] / venues["count"].sum()
    out = []
    for u in range(n_users):
        v = rng.choice(len(prob), size=n_records, p=prob)
        t = T0_MIN + np.cumsum(rng.integers(10, 720, size=n_records))
        recs = [
            {"venue": venues["id"][i].item(), "time": f"{np.datetime64(int(m), 'm')}:00Z"}
            for i, m in zip(v, t, strict=True)
        ]
        out.append({"user": f"u{u}", "records": recs, "at": f"{np.datetime64(int(t[-1]) + 60, 'm')}:00Z"})
    return out


def _cells(fns: dict[str, Any], warmup_s: float, budget_s: float, max_rounds: int = 2000) -> dict[str, list]:
    """Warm every fn up, then call them round-robin until ``budget_s`` (at least 5 rounds): the cells see the
    same load on a shared machine, so their ratio is fair. -> {name: latencies in ms}."""
    for fn in fns.values():
        t_end, n = time.perf_counter() + warmup_s / len(fns), 0
        while n < 2 or time.perf_counter() < t_end:
            fn()
            n += 1
    lat: dict[str, list] = {k: [] for k in fns}
    t_end = time.perf_counter() + budget_s
    while len(lat[next(iter(fns))]) < 5 or (
        time.perf_counter() < t_end and len(lat[next(iter(fns))]) < max_rounds
    ):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            lat[k].append((time.perf_counter() - t) * 1e3)
    return lat


def e2e_backend(predictor: Any, users: list[dict], batch_sizes: list[int], warmup_s: float, budget_s: float,
                device: str = "cpu") -> list[dict[str, Any]]:  # fmt: skip
    """Rows (path state and raw) of one backend's ``Predictor``."""
    from nextlocmoe.serve.history import parse_time
    from nextlocmoe.serve.history import sequence as history_sequence
    from nextlocmoe.serve.predictor import Query

    held = []
    for u in users:
        h = predictor.new_history()
        for r in u["records"]:
            predictor.add_record(h, r)
        held.append(Query(u["user"], h, parse_time(u["at"])))
    rows = []
    for b in batch_sizes:
        qs = [held[i % len(held)] for i in range(b)]
        reqs = [users[i % len(users)] for i in range(b)]

        def state(qs: list = qs) -> Any:
            return predictor.predict_queries(qs, 10)

        def raw(reqs: list = reqs) -> Any:
            hs = [predictor.new_history() for _ in reqs]
            for h, u in zip(hs, reqs, strict=True):
                predictor.add_records(h, u["records"])
            return predictor.predict_queries(
                [Query(u["user"], h, parse_time(u["at"])) for h, u in zip(hs, reqs, strict=True)]
            )

        feed = predictor.features([history_sequence(q.hist, len(q.hist), q.at, predictor.window) for q in qs])
        lat = _cells({"graph": lambda feed=feed: predictor.runner.run(feed), "state": state, "raw": raw},
                     warmup_s, 2 * budget_s)  # fmt: skip
        graph = float(np.percentile(lat["graph"], 50))
        for path in ("state", "raw"):
            r = row(predictor.backend, device, b, lat[path])
            rows.append(
                {
                    **r,
                    "path": path,
                    "graph_p50_ms": round(graph, 4),
                    "over_graph": round(r["p50_ms"] / graph, 3),
                }
            )
            msg = "e2e %-11s %-5s batch %4d  p50 %.3f ms (graph %.3f ms interleaved)"
            log.info(msg, predictor.backend, path, b, r["p50_ms"], graph)
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def _wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early (status {proc.returncode}): {proc.stderr.read()[-500:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            if _request(conn, "GET", "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server on 127.0.0.1:{port} not ready within {timeout_s:.0f} s")


def _client(
    port: int, users: list[dict], stop: float, lat: list[float], errors: list[int], seed: int
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    i = seed
    while time.perf_counter() < stop:
        u = users[i % len(users)]
        t = time.perf_counter()
        code, _ = _request(conn, "POST", "/predict", {"user": u["user"], "at": u["at"], "top_k": 10})
        lat.append((time.perf_counter() - t) * 1e3)
        if code != 200:
            errors.append(code)
        i += 7


def load_test(engine_dir: Path, users: list[dict], clients: int, seconds: float, max_batch: int = 32,
              max_wait_ms: float = 2.0) -> dict[str, Any]:  # fmt: skip
    """``nextlocmoe serve`` on 127.0.0.1 (subprocess), ``clients`` threads for ``seconds``; stopped after."""
    port = _free_port()
    cmd = [sys.executable, "-m", "nextlocmoe.cli", "serve", "--engine", str(engine_dir), "--host",
           "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch),
           "--max-wait-ms", str(max_wait_ms)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(port, proc)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for u in users:  # the users' state, as a live service would hold it
            code, res = _request(conn, "POST", "/events", {"user": u["user"], "records": u["records"]})
            if code != 200:
                raise RuntimeError(f"/events answered {code}: {res}")
        lats: list[list[float]] = [[] for _ in range(clients)]
        errors: list[int] = []
        stop = time.perf_counter() + seconds
        threads = [
            threading.Thread(target=_client, args=(port, users, stop, lats[i], errors, i))
            for i in range(clients)
        ]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=seconds + 60)
        wall = time.perf_counter() - t0
        conn.close()  # idle past the server's keep-alive during the run: a new connection
        _, metrics = _request(http.client.HTTPConnection("127.0.0.1", port, timeout=30), "GET", "/metrics")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = np.concatenate([np.array(x) for x in lats if x]) if any(lats) else np.zeros(1)
    return {"clients": clients, "seconds": seconds, "requests": int(len(lat)), "errors": len(errors),
            "req_per_s": round(len(lat) / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3), "max_batch": max_batch,
            "max_wait_ms": max_wait_ms, "server_batch_sizes": metrics.get("batch_sizes"),
            "server_predict_latency": metrics.get("predict_latency"), "host": "127.0.0.1"}  # fmt: skip


def _predictor(engine_dir: Path, name: str) -> tuple[Any, str]:
    """A Predictor on backend ``name``: its own onnxruntime / torch, or an export.backends runner (tensorrt,
    compile, aoti) -> (predictor, device); RuntimeError with the reason when the backend cannot run here."""
    from export.backends import make_runner
    from nextlocmoe.serve.predictor import Predictor

    if name in ("onnxruntime", "torch"):
        return Predictor(engine_dir, name), "cpu"
    runner = make_runner(name)
    reason = runner.unavailable()
    if reason:
        raise RuntimeError(reason)
    runner.prepare(engine_dir)
    pred = Predictor(engine_dir, runner=runner)
    pred.backend = name
    return pred, runner.device


def run_e2e(engine_dir: Path, backends: list[str], batch_sizes: list[int], warmup_s: float,
            budget_s: float) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """e2e rows for ``backends``; returns (rows, skipped with the reason)."""
    from nextlocmoe.serve.engine import load_engine

    engine = load_engine(engine_dir)
    w = engine.windows
    users = synthetic_users(engine.venues, 64, max(int(w["pointer"]), int(w["history"]) + int(w["current"])))
    rows, skipped = [], []
    for name in backends:
        try:
            pred, device = _predictor(engine_dir, name)
        except Exception as e:  # noqa: BLE001 - reported, never silently dropped
            skipped.append({"backend": name, "reason": f"e2e: {type(e).__name__}: {str(e)[:200]}"})
            continue
        rows += e2e_backend(pred, users, batch_sizes, warmup_s, budget_s, device)
    return rows, skipped


def e2e_ratio(graph_rows: list[dict], e2e_rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per backend, end-to-end (path state) batch-1 p50 over graph-only batch-1 p50: ``interleaved`` (the
    graph timed in the same loop as the request) and ``vs_graph_rows`` (the graph rows of this run)."""
    g = {r["backend"]: r["p50_ms"] for r in graph_rows if r["batch"] == 1}
    out = {}
    for r in e2e_rows:
        if r["batch"] == 1 and r["path"] == "state":
            b = r["backend"]
            out[b] = {
                "interleaved": r["over_graph"],
                "vs_graph_rows": round(r["p50_ms"] / g[b], 3) if g.get(b) else None,
            }
    return out
