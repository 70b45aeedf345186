"""The benchmark behind ``export/bench.py``: the same held-out inputs for every backend, warm-up, then
timed runs time-boxed per (backend, batch) cell; percentiles, a printed table, JSON and a PNG plot.

Row keys (docs/CONTRACT.md): backend, device, batch, p50_ms, p90_ms, p99_ms, samples_per_s, n_runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import samples
from export.backends import ONNX_FILE, make_runner, read_meta

log = logging.getLogger("bench")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_cell(
    runner: Any,
    inputs: dict[str, torch.Tensor],
    warmup_s: float,
    budget_s: float,
    min_runs: int = 5,
    max_runs: int = 1000,
) -> list[float]:
    """Warm up (at least 2 calls, ~warmup_s), then run until ``budget_s`` or ``max_runs`` (at least
    ``min_runs``); returns per-call latencies in ms (results copied to the host inside each call)."""
    t_end, n = time.perf_counter() + warmup_s, 0
    while n < 2 or time.perf_counter() < t_end:
        runner.run(inputs)
        n += 1
    _sync(runner.device)
    lat: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(lat) < min_runs or (time.perf_counter() < t_end and len(lat) < max_runs):
        t = time.perf_counter()
        runner.run(inputs)
        _sync(runner.device)
        lat.append((time.perf_counter() - t) * 1e3)
    return lat


def row(backend: str, device: str, batch: int, lat_ms: list[float]) -> dict[str, Any]:
    p50, p90, p99 = (float(np.percentile(lat_ms, q)) for q in (50, 90, 99))
    return {"backend": backend, "device": device, "batch": batch, "p50_ms": round(p50, 4),
            "p90_ms": round(p90, 4), "p99_ms": round(p99, 4),
            "samples_per_s": round(batch * 1e3 / p50, 2), "n_runs": len(lat_ms)}  # fmt: skip


def bench_backend(
    name: str,
    engine_dir: Path,
    pool: dict[str, torch.Tensor],
    batch_sizes: list[int],
    warmup_s: float,
    budget_s: float,
    device: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """All batch sizes of one backend -> (rows, skip reason or None)."""
    runner = make_runner(name, device)
    reason = runner.unavailable()
    if reason:
        return [], reason
    t = time.time()
    try:
        runner.prepare(engine_dir)
    except Exception as e:  # a backend that fails to build here is reported, not fatal
        return [], f"prepare failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    log.info("%s prepared on %s in %.1fs", name, runner.device, time.time() - t)
    rows = []
    for b in batch_sizes:
        lat = time_cell(runner, samples.tile_batch(pool, b), warmup_s, budget_s)
        rows.append(row(name, runner.device, b, lat))
        log.info("%-12s batch %4d  p50 %.3f ms (%d runs)", name, b, rows[-1]["p50_ms"], len(lat))
    return rows, None


def run_bench(
    engine_dir: str | Path,
    backends: list[str],
    batch_sizes: list[int],
    warmup_s: float = 1.0,
    budget_s: float = 3.0,
) -> dict[str, Any]:
    engine_dir = Path(engine_dir)
    meta = read_meta(engine_dir)
    pool = samples.load_inputs(engine_dir / "sample_inputs.npz")
    check_inputs(engine_dir, pool, meta["input_names"])
    result: dict[str, Any] = {"engines": str(engine_dir), "rows": [], "skipped": [], "meta": meta,
                              "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip
    for name in backends:
        rows, reason = bench_backend(name, engine_dir, pool, batch_sizes, warmup_s, budget_s)
        result["rows"] += rows
        if reason:
            log.info("%s skipped: %s", name, reason)
            result["skipped"].append({"backend": name, "reason": reason})
    return result


def check_inputs(engine_dir: Path, pool: dict[str, torch.Tensor], names: list[str]) -> None:
    """The benchmark inputs must be what the engine declares (names; dtypes and shapes from model.onnx):
    one ValueError naming the file and the input otherwise, before any backend runs."""
    path = engine_dir / "sample_inputs.npz"
    missing = [n for n in names if n not in pool]
    if missing:
        raise ValueError(f"{path}: lacks engine input(s) {missing} (frozen.json input_names)")
    onnx = engine_dir / ONNX_FILE
    if onnx.is_file():
        from export.onnx_io import OnnxInputError, OrtSession, to_numpy

        try:
            OrtSession(onnx).validate({n: to_numpy(pool[n]) for n in names})
        except OnnxInputError as e:
            raise ValueError(f"{path}: {e} (as declared by {onnx})") from None


def format_table(result: dict[str, Any]) -> str:
    cols = ("backend", "device", "batch", "p50_ms", "p90_ms", "p99_ms", "samples/s", "runs")
    head = " ".join(f"{c:<12}" if i < 2 else f"{c:>9}" for i, c in enumerate(cols))
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        vals = (r["batch"], r["p50_ms"], r["p90_ms"], r["p99_ms"], r["samples_per_s"], r["n_runs"])
        lines.append(f"{r['backend']:<12} {r['device']:<12} " + " ".join(f"{v:>9.4g}" for v in vals))
    lines += [f"skipped {s['backend']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> None:
    """p50 latency (with p90 whiskers) vs batch, one line per backend, log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r["backend"] for r in result["rows"]):
        rs = [r for r in result["rows"] if r["backend"] == name]
        x, p50 = [r["batch"] for r in rs], [r["p50_ms"] for r in rs]
        err = [[0] * len(rs), [r["p90_ms"] - r["p50_ms"] for r in rs]]
        ax.errorbar(x, p50, yerr=err, marker="o", capsize=3, label=f"{name} ({rs[0]['device']})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency per batch, ms (p50, bar to p90)")
    skipped = ", ".join(s["backend"] for s in result["skipped"])
    ax.set_title("NextLocMoE inference latency" + (f"\nskipped: {skipped}" if skipped else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
