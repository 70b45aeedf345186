"""``Predictor``: raw records in, ranked original venue ids out, on an engine folder (docs/SERVING.md).

    p = Predictor("demo-out/engines")                       # ONNX Runtime on CPU
    p.predict([{"user": "u1", "venue": 1234, "time": "2012-05-01T12:00:00Z"}, ...], at="2012-05-01T15:00Z")

Backends: ``onnxruntime`` (default; ``model.onnx``), ``torch`` (``frozen.pt2``, the exported program),
or any object with ``run({input name: array}) -> {output name: array}`` passed as ``runner`` (export/bench.py
passes TensorRT's this way). Every answer is one dict: ``user, at, venues, scores, engine_version, source``
("model", or "popularity" for a user with fewer than C + min_history records: the engine's most visited
venues, ``note`` says why).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nextlocmoe.data.featurize import sample_features, sequence_columns
from nextlocmoe.data.parsing import local_weekday_hour
from nextlocmoe.serve.engine import Engine, load_engine
from nextlocmoe.serve.history import (
    RequestError,
    UserHistory,
    VenueIndex,
    iso_minutes,
    parse_time,
    parse_times,
    record_xy,
)
from nextlocmoe.serve.history import sequence as history_sequence

BACKENDS = ("onnxruntime", "torch")


class OrtBackend:
    """``model.onnx`` through ONNX Runtime (CPU; ``threads`` 0 = its default)."""

    name = "onnxruntime"

    def __init__(self, engine_dir: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # idle intra-op threads would spin after each run and take the CPU from the featurizer between runs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sess = ort.InferenceSession(
            str(engine_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.inputs = [i.name for i in self.sess.get_inputs()]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(
            zip(self.outputs, self.sess.run(self.outputs, {n: feed[n] for n in self.inputs}), strict=True)
        )


class TorchBackend:
    """``frozen.pt2`` (torch.export program of the frozen model) run eagerly on CPU."""

    name = "torch"

    def __init__(self, engine_dir: Path, input_names: list[str], output_names: list[str]) -> None:
        import torch

        self.torch = torch
        self.module = torch.export.load(str(engine_dir / "frozen.pt2")).module()
        self.inputs, self.outputs = input_names, output_names

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            outs = self.module(*(self.torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.inputs))
        return {n: o.numpy() for n, o in zip(self.outputs, outs, strict=True)}


def make_backend(engine: Engine, backend: str, threads: int = 0) -> Any:
    if backend == "onnxruntime":
        return OrtBackend(engine.path, threads)
    if backend == "torch":
        return TorchBackend(
            engine.path, list(engine.frozen["input_names"]), list(engine.frozen["output_names"])
        )
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)} (or pass runner=)")


@dataclass
class Query:
    """One prediction to make: ``user`` (original id, echoed), its ``hist``, and the query minute ``at``."""

    user: Any
    hist: UserHistory
    at: int


class Predictor:
    """Featurize (``featurize.sample_features``) -> engine -> decode to original venue ids, batched."""

    def __init__(self, engine_dir: str | Path, backend: str = "onnxruntime", runner: Any = None,
                 threads: int = 0, timezone: str | None = None) -> None:  # fmt: skip
        self.engine = load_engine(engine_dir)
        self.runner = runner if runner is not None else make_backend(self.engine, backend, threads)
        self.backend = getattr(self.runner, "name", backend)
        w = self.engine.windows
        self.H, self.C, self.P = int(w["history"]), int(w["current"]), int(w["pointer"])
        self.min_records = self.C + int(w.get("min_history", 1))
        self.window = max(self.P, self.H + self.C)
        self.tz = timezone if timezone is not None else self.engine.meta["time"]["timezone"]
        self.index = VenueIndex(self.engine.venues["id"])
        self.popular = np.lexsort((np.arange(len(self.index.map)), -self.engine.venues["count"]))
        self.input_names = list(self.engine.frozen["input_names"])

    def new_history(self, bounded: bool = True) -> UserHistory:
        """An empty history: the last max(P, H + C) records (a live user's state), or all of them
        (``bounded=False``: offline records answered at several earlier times)."""
        return UserHistory(self.window if bounded else 1 << 62, self.tz)

    def add_record(self, hist: UserHistory, rec: dict[str, Any], allow_past: bool = False) -> bool:
        """Validate one raw record {venue, time, lat?, lon?} and add it to ``hist``."""
        if "venue" not in rec or rec["venue"] is None or str(rec["venue"]).strip() == "":
            raise RequestError("record lacks 'venue'")
        t = parse_time(rec.get("time"), "time")
        loc, x, y = record_xy(self.engine, self.index, rec["venue"], rec.get("lat"), rec.get("lon"))
        return hist.add(loc, x, y, t, allow_past)

    def add_records(self, hist: UserHistory, recs: list[dict[str, Any]], allow_past: bool = False) -> int:
        """Validate every record first (all or nothing: RequestError names ``records[i]``), then add them in
        order; returns how many were added (repeats of a (venue, minute) are not)."""
        times = parse_times([r.get("time") for r in recs])
        parsed = []
        for i, r in enumerate(recs):
            if r.get("venue") is None or str(r["venue"]).strip() == "":
                raise RequestError(f"records[{i}]: lacks 'venue'")
            try:
                parsed.append(record_xy(self.engine, self.index, r["venue"], r.get("lat"), r.get("lon")))
            except RequestError as e:
                raise RequestError(f"records[{i}]: {e}") from None
        if not allow_past and (
            np.any(np.diff(times) < 0) or (len(hist) and len(times) and times[0] < hist.t_min[-1])
        ):
            last = hist.t_min[-1] if len(hist) else int(times[0])
            raise RequestError(
                f"records go back in time (before {iso_minutes(last)}): events must arrive in time order"
            )
        wd, hr = local_weekday_hour(times, self.tz)
        staged = hist.copy()
        if len(times) and np.all(np.diff(times) > 0) and (not len(hist) or times[0] > hist.t_min[-1]):
            staged.extend(parsed, times, wd, hr)  # the usual case: new, strictly later records
            n = len(times)
        else:
            n = sum(
                staged.add(*p, int(t), allow_past, (a, b))
                for p, t, a, b in zip(parsed, times, wd, hr, strict=True)
            )
        hist.__dict__.update(staged.__dict__)
        return n

    def histories(self, records: Iterable[dict[str, Any]]) -> dict[Any, UserHistory]:
        """Records of any users in any order -> {user: UserHistory} in time order (RequestError names the
        row)."""
        out: dict[Any, UserHistory] = {}
        rows = list(records)
        order = sorted(range(len(rows)), key=lambda i: parse_time(rows[i].get("time"), f"record {i}: time"))
        for i in order:
            r = rows[i]
            if r.get("user") is None:
                raise RequestError(f"record {i}: lacks 'user'")
            try:
                self.add_record(out.setdefault(r["user"], self.new_history(False)), r, allow_past=True)
            except RequestError as e:
                raise RequestError(f"record {i}: {e}") from None
        return out

    def predict(self, records: Iterable[dict[str, Any]], at: Any, top_k: int = 10) -> list[dict[str, Any]]:
        """Raw records -> one answer per user at time ``at`` (one time for all, or {user: time})."""
        hists = self.histories(records)
        times = at if isinstance(at, dict) else dict.fromkeys(hists, at)
        qs = [
            Query(u, hists.get(u, self.new_history()), parse_time(t, f"at[{u!r}]")) for u, t in times.items()
        ]
        return self.predict_queries(qs, top_k)

    def check_top_k(self, top_k: int) -> int:
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= self.engine.k:
            raise RequestError(
                f"top_k must be an integer in 1..{self.engine.k} (the engine's k), got {top_k!r}"
            )
        return top_k

    def predict_queries(self, queries: list[Query], top_k: int = 10) -> list[dict[str, Any]]:
        """The batched core: every query with enough history goes through the engine in one batch."""
        top_k = self.check_top_k(top_k)
        ns = [q.hist.before(q.at) for q in queries]
        model_rows = [i for i, n in enumerate(ns) if n >= self.min_records]
        answers: list[Any] = [
            None if n >= self.min_records else self._popularity(q, n, top_k)
            for q, n in zip(queries, ns, strict=True)
        ]
        if model_rows:
            seqs = [history_sequence(queries[i].hist, ns[i], queries[i].at, self.window) for i in model_rows]
            out = self.run_sequences(seqs)
            for j, i in enumerate(model_rows):
                answers[i] = self._answer(
                    queries[i], out["topk_ids"][j, :top_k], out["topk_scores"][j, :top_k], "model"
                )
        return answers

    def features(self, seqs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The engine's input tensors for query sequences (``history.sequence``)."""
        cols, r = sequence_columns(seqs, float(self.engine.meta["duration"]["cap_min"]))
        f = sample_features(cols, self.engine.stats, r, self.H, self.C, self.P)
        f["user"] = np.zeros(len(r), dtype=np.int64)  # dense training user ids are not an input of the graph
        return {n: f[n] for n in self.input_names}

    def run_sequences(self, seqs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return self.runner.run(self.features(seqs))

    def _answer(self, q: Query, ids: np.ndarray, scores: np.ndarray, source: str, note: str = "") -> dict:
        keep = ids >= 0  # a retrieval engine pads with -1 when a sample has fewer than k candidates
        ids, scores = ids[keep], scores[keep]
        a = {"user": q.user, "at": iso_minutes(q.at), "venues": self.engine.venues["id"][ids].tolist(),
             "scores": [round(float(s), 6) for s in scores], "engine_version": self.engine.version,
             "source": source}  # fmt: skip
        if note:
            a["note"] = note
        return a

    def _popularity(self, q: Query, n: int, top_k: int) -> dict[str, Any]:
        ids = self.popular[:top_k]
        counts = self.engine.venues["count"][ids]
        note = (
            f"cold start: {n} record(s) before the query, the model needs {self.min_records} (current "
            "window + min history); the engine's most visited venues, score = log share of visits"
        )
        scores = np.log(counts / max(1, int(self.engine.venues["count"].sum())))
        return self._answer(q, ids, scores, "popularity", note)
