"""``nextlocmoe predict`` and ``nextlocmoe serve``: argument parsing only (docs/SERVING.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", required=True, type=Path, help="engine folder written by export/export.py")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"))
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--timezone", default=None, help="IANA zone for weekday/hour (default: the engine's)")


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="rank next venues from raw records with an engine folder",
        description="Raw check-in records (the CSV columns of `prepare --dataset csv`) -> JSON lines: user, "
        "query time, ranked original venue ids, scores, engine version.",
    )
    _engine_args(p)
    p.add_argument(
        "--records", required=True, type=Path, help="CSV of records (user, venue, time[, lat, lon])"
    )
    p.add_argument(
        "--at",
        default="now",
        help="query time for every user (unix s / ISO-8601 / now), or a CSV of (user, time) rows: one "
        "prediction per row (default now)",
    )
    p.add_argument("--top-k", type=int, default=10, help="venues per answer (<= the engine's k)")
    p.add_argument("--out", type=Path, default=None, help="JSON lines file (default stdout)")
    p.add_argument("--user-col", default="user")
    p.add_argument("--venue-col", default="venue")
    p.add_argument("--time-col", default="time")
    p.add_argument("--lat-col", default=None, help="needed for venues the engine has not seen")
    p.add_argument("--lon-col", default=None)
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from nextlocmoe.serve.batch import Columns, run_predict
    from nextlocmoe.serve.predictor import Predictor

    if bool(args.lat_col) != bool(args.lon_col):
        raise ValueError("give both --lat-col and --lon-col, or neither")
    pred = Predictor(args.engine, args.backend, threads=args.threads, timezone=args.timezone)
    spec = Columns(args.user_col, args.venue_col, args.time_col, args.lat_col, args.lon_col)
    summary = run_predict(pred, args.records, args.at, args.top_k, args.out, spec)
    print("predict: " + json.dumps(summary), file=sys.stderr)
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP JSON service over an engine folder (FastAPI on uvicorn)",
        description="POST /events, /predict; GET /healthz, /readyz, /metrics (docs/SERVING.md).",
    )
    _engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="micro-batch: most queries per engine call")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="micro-batch: longest wait to fill a batch")
    p.add_argument(
        "--max-users", type=int, default=100_000, help="per-user states kept (least recent evicted)"
    )
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from nextlocmoe.serve.server import ServerSettings, run_server
    except ImportError as e:
        raise RuntimeError(
            f"nextlocmoe serve needs fastapi and uvicorn ({e}): pip install 'nextlocmoe[serve]'"
        ) from None

    s = ServerSettings(args.max_batch, args.max_wait_ms, args.max_users)
    run_server(
        args.engine, args.backend, args.host, args.port, s, threads=args.threads, timezone=args.timezone
    )
    return 0
