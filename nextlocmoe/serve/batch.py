"""``nextlocmoe predict``: a records CSV (the columns of ``prepare --dataset csv``) -> JSON lines.

Queries: one time for every user in the file (``--at TIME``, default ``now``), or a CSV of (user, time)
rows (``--at FILE``, the same column names): one prediction per row. A row that cannot be used is counted
under a reason with its first ``file:line``, reported on stderr and in the summary; nothing is dropped
silently.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nextlocmoe.data.parsing import DataError, read_csv_columns
from nextlocmoe.serve.history import RequestError, parse_time
from nextlocmoe.serve.predictor import Predictor, Query

CHUNK = 256  # queries per engine batch


@dataclass
class Columns:
    user: str = "user"
    venue: str = "venue"
    time: str = "time"
    lat: str | None = None
    lon: str | None = None


def _rows(path: Path, cols: list[str], optional: list[str]) -> tuple[list[dict[str, Any]], list[int], int]:
    c = read_csv_columns(path, cols, optional)
    n = len(c.lines)
    rows = [{k: c.cols[k][i] for k in c.cols} for i in range(n)]
    return rows, [int(x) for x in c.lines], int(getattr(c, "n_malformed", 0))


def read_histories(p: Predictor, path: Path, spec: Columns) -> tuple[dict[Any, Any], dict[str, Any]]:
    """Records CSV -> ({user: UserHistory}, accounting {rows, kept, dropped {reason: n}, first {reason:
    line}})."""
    need = [spec.user, spec.venue, spec.time] + [c for c in (spec.lat, spec.lon) if c]
    rows, lines, malformed = _rows(path, need, [])
    stamped = []
    dropped: Counter = Counter({"malformed_row": malformed} if malformed else {})
    first: dict[str, str] = {}
    for r, line in zip(rows, lines, strict=True):
        try:
            stamped.append((parse_time(r[spec.time], spec.time), line, r))
        except RequestError as e:
            dropped["unparsable_time"] += 1
            first.setdefault("unparsable_time", f"{path.name}:{line}: {e}")
    stamped.sort(key=lambda x: (x[0], x[1]))
    hists: dict[Any, Any] = {}
    for _, line, r in stamped:
        rec = {
            "venue": r[spec.venue],
            "time": r[spec.time],
            "lat": r.get(spec.lat or ""),
            "lon": r.get(spec.lon or ""),
        }
        rec = {k: (None if v == "" else v) for k, v in rec.items()}
        try:
            if not str(r[spec.user]).strip():
                raise RequestError(f"{spec.user} is empty")
            if not p.add_record(
                hists.setdefault(r[spec.user].strip(), p.new_history(bounded=False)), rec, allow_past=True
            ):
                dropped["duplicate"] += 1
        except RequestError as e:
            reason = "unknown_venue" if "not in the engine's venue table" in str(e) else "bad_row"
            reason = "bad_coordinate" if "bad coordinates" in str(e) or "not numbers" in str(e) else reason
            dropped[reason] += 1
            first.setdefault(reason, f"{path.name}:{line}: {e}")
    kept = len(rows) - sum(v for k, v in dropped.items() if k != "malformed_row")
    acct = {"rows": len(rows) + malformed, "kept": kept, "dropped": dict(dropped), "first": first}
    return hists, acct


def read_queries(path_or_time: str, hists: dict[Any, Any], spec: Columns) -> list[tuple[Any, int]]:
    """``--at``: 'now', a time (unix seconds / ISO-8601) for every user, or a CSV of (user, time) rows."""
    if path_or_time == "now":
        t = int(time.time() // 60)
        return [(u, t) for u in hists]
    path = Path(path_or_time)
    if not path.is_file():
        t = parse_time(path_or_time, "--at")
        return [(u, t) for u in hists]
    rows, lines, _ = _rows(path, [spec.user, spec.time], [])
    out = []
    for r, line in zip(rows, lines, strict=True):
        try:
            out.append((r[spec.user].strip(), parse_time(r[spec.time], spec.time)))
        except RequestError as e:
            raise DataError(f"{path}:{line}: {e}") from None
    return out


def run_predict(p: Predictor, records: Path, at: str, top_k: int, out: Path | None, spec: Columns) -> dict:
    """The whole ``predict`` command; returns the summary (also printed on stderr by the CLI)."""
    p.check_top_k(top_k)
    hists, acct = read_histories(p, Path(records), spec)
    queries = read_queries(at, hists, spec)
    sink = open(out, "w") if out else sys.stdout  # noqa: SIM115 - closed below
    n_src: Counter = Counter()
    try:
        for a in tqdm(
            range(0, len(queries), CHUNK), desc="predict", disable=len(queries) <= CHUNK, mininterval=5
        ):
            qs = [Query(u, hists.get(u) or p.new_history(), t) for u, t in queries[a : a + CHUNK]]
            for ans in p.predict_queries(qs, top_k):
                n_src[ans["source"]] += 1
                sink.write(json.dumps(ans) + "\n")
    finally:
        if out:
            sink.close()
    return {
        "records": acct,
        "predictions": len(queries),
        "by_source": dict(n_src),
        "engine_version": p.engine.version,
    }
