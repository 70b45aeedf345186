"""``nextlocmoe serve``: HTTP JSON over an engine folder, FastAPI on uvicorn (docs/SERVING.md "HTTP API").

- ``POST /events``  {"user", "records": [{"venue", "time", "lat"?, "lon"?}, ...]}: appends to the user's state
  (the last max(P, H + C) records, kept in memory, least recently used users evicted past ``max_users``).
- ``POST /predict`` {"user", "at"?, "top_k"?, "records"?}: ranked venues at ``at`` (default: now) from the
  user's state, or statelessly from ``records`` when given. Answer: the ``Predictor`` dict.
- ``GET /healthz`` (process up), ``GET /readyz`` (engine loaded and warmed up: 200, else 503),
  ``GET /metrics`` (requests by route and status, predict latency p50/p99 over the last 10,000, batch sizes).

Requests wait in a micro-batcher: the first one opens a batch, which closes at ``max_batch`` queries or
``max_wait_ms`` after it opened, and runs as one engine call in a worker thread. Every bad request is a 4xx
with ``{"error": one line}``: 400 malformed JSON, 422 a field that fails validation (unknown venue without
lat/lon, NaN / out-of-range coordinates, unparsable time, top_k out of range), 409 an event or query time
earlier than the user's last recorded event.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from nextlocmoe.serve.history import RequestError, UserHistory, parse_time
from nextlocmoe.serve.predictor import Predictor, Query

Id = str | int
Time = str | float | int


class Record(BaseModel):
    venue: Id
    time: Time
    lat: float | None = None
    lon: float | None = None


class EventsBody(BaseModel):
    user: Id
    records: list[Record]


class PredictBody(BaseModel):
    user: Id
    at: Time | None = None
    top_k: int = 10
    records: list[Record] | None = None


@dataclass
class ServerSettings:
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_users: int = 100_000


class MicroBatcher:
    """Collects queries into batches (``max_batch``, ``max_wait_ms``) run by ``fn(list) -> list`` in one
    worker thread; ``sizes`` counts the batch sizes run."""

    def __init__(self, fn: Any, max_batch: int, max_wait_ms: float) -> None:
        self.fn, self.max_batch, self.max_wait = fn, max(1, max_batch), max(0.0, max_wait_ms) / 1e3
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.sizes: Counter = Counter()

    async def submit(self, item: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((item, fut))
        return await fut

    async def _collect(self) -> list:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self.sizes[len(batch)] += 1
            try:
                results = await loop.run_in_executor(self.pool, self.fn, [b[0] for b in batch])
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                results = [e] * len(batch)
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_exception(res) if isinstance(res, Exception) else fut.set_result(res)


class State:
    """Per-user histories (LRU), the predictor, the batcher and the metrics of one server."""

    def __init__(self, predictor: Predictor, settings: ServerSettings) -> None:
        self.p, self.settings = predictor, settings
        self.users: OrderedDict[Any, UserHistory] = OrderedDict()
        self.batcher = MicroBatcher(self._run_batch, settings.max_batch, settings.max_wait_ms)
        self.ready = False
        self.counts: Counter = Counter()
        self.latency_ms: deque = deque(maxlen=10_000)

    def _run_batch(self, items: list[tuple[Query, int]]) -> list[Any]:
        """Worker thread: queries grouped by top_k (usually one group) -> answers in order."""
        out: list[Any] = [None] * len(items)
        for k in sorted({k for _, k in items}):
            idx = [i for i, (_, kk) in enumerate(items) if kk == k]
            for i, ans in zip(idx, self.p.predict_queries([items[i][0] for i in idx], k), strict=True):
                out[i] = ans
        return out

    def warm_up(self) -> None:
        """One engine call on a made-up history (venue 0, hourly) before the server says it is ready."""
        p, warm = self.p, self.p.new_history()
        for i in range(p.min_records):
            warm.add(0, float(p.engine.venues["x"][0]), float(p.engine.venues["y"][0]), 60 * i)
        p.predict_queries([Query("warm-up", warm, 60 * p.min_records)], 1)

    def metrics(self) -> dict[str, Any]:
        """GET /metrics: requests per (route, status), /predict latency p50/p99, micro-batch sizes."""
        lat = np.array(self.latency_ms) if self.latency_ms else None
        pct = {f"p{q}_ms": None if lat is None else round(float(np.percentile(lat, q)), 3) for q in (50, 99)}
        reqs = {f"{p} {s}": n for (p, s), n in sorted(self.counts.items())}
        sizes = dict(sorted(self.batcher.sizes.items()))
        return {"requests": reqs, "predict_latency": pct, "batch_sizes": sizes, "users": len(self.users),
                "settings": vars(self.settings)}  # fmt: skip

    def history(self, user: Any) -> UserHistory | None:
        """The user's state (marked recently used), None when the server holds none."""
        h = self.users.get(user)
        if h is not None:
            self.users.move_to_end(user)
        return h

    def add_events(self, user: Any, records: list[Record]) -> dict[str, Any]:
        """Validate every record first (all or nothing), then append in order."""
        found = self.users.get(user)
        staged = found.copy() if found is not None else self.p.new_history()
        added = self.p.add_records(staged, [r.model_dump() for r in records])
        self.users[user] = staged
        self.users.move_to_end(user)
        while len(self.users) > self.settings.max_users:
            self.users.popitem(last=False)
        return {"user": user, "added": added, "duplicates": len(records) - added, "stored": len(staged)}


def _error(status: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(msg).split())}, status_code=status)


def _status(e: RequestError) -> int:
    return 409 if "time order" in str(e) or "before the user's last" in str(e) else 422


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        e = next(e for e in errs if e.get("type") == "json_invalid")
        return _error(400, f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
    e = errs[0]
    where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
    return _error(422, f"{where or 'body'}: {e.get('msg')}")


def create_app(predictor: Predictor, settings: ServerSettings | None = None) -> FastAPI:
    st = State(predictor, settings or ServerSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(st.batcher.run())
        await asyncio.get_running_loop().run_in_executor(st.batcher.pool, st.warm_up)
        st.ready = True
        yield
        task.cancel()
        st.batcher.pool.shutdown(wait=False)

    app = FastAPI(title="NextLocMoE", lifespan=lifespan)
    app.state.st = st

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        st.counts[(request.url.path, 400 if "json_invalid" in str(exc.errors()) else 422)] += 1
        return _validation_error(exc)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        body = {"ready": st.ready, "engine_version": predictor.engine.version, "backend": predictor.backend}
        return JSONResponse(body, status_code=200 if st.ready else 503)

    @app.post("/events")
    async def events(body: EventsBody) -> Any:
        try:
            res = st.add_events(body.user, body.records)
        except RequestError as e:
            st.counts[("/events", _status(e))] += 1
            return _error(_status(e), e)
        st.counts[("/events", 200)] += 1
        return res

    @app.post("/predict")
    async def predict(body: PredictBody) -> Any:
        t0 = time.perf_counter()
        try:
            q = _query(st, body)
            predictor.check_top_k(body.top_k)
        except RequestError as e:
            st.counts[("/predict", _status(e))] += 1
            return _error(_status(e), e)
        ans = await st.batcher.submit((q, body.top_k))
        st.latency_ms.append((time.perf_counter() - t0) * 1e3)
        st.counts[("/predict", 200)] += 1
        return ans

    @app.get("/metrics")
    async def metrics() -> dict:
        return st.metrics()

    return app


def _query(st: State, body: PredictBody) -> Query:
    """The Query of a /predict body: its own records (stateless) or a snapshot of the user's state."""
    at = int(time.time() // 60) if body.at is None else parse_time(body.at, "at")
    if body.records is not None:
        hist = st.p.new_history()
        st.p.add_records(hist, [r.model_dump() for r in body.records], allow_past=True)
    else:
        found = st.history(body.user)
        hist = found.copy() if found is not None else st.p.new_history()
    if len(hist) and at < hist.t_min[-1] and body.records is None:
        raise RequestError(
            f"at ({at * 60} s) is before the user's last recorded event: query times must not go back"
        )
    if not math.isfinite(at):
        raise RequestError("at: not finite")
    return Query(body.user, hist, at)


def run_server(
    engine: str | Path, backend: str, host: str, port: int, settings: ServerSettings, **kw: Any
) -> None:
    import uvicorn

    app = create_app(Predictor(engine, backend, **kw), settings)
    uvicorn.run(app, host=host, port=port, log_level="warning")
