"""Entry: ``python export/bench.py --engines ENGINE_DIR [--backends torch,compile,aoti,onnxruntime,tensorrt]
--batch-sizes 1,8,64 --out bench.json [--plot bench.png] [--no-e2e] [--load-clients N --load-seconds S]``
(docs/CONTRACT.md "bench", docs/SERVING.md). Parse -> ``export.timing.run_bench`` (graph rows) +
``export.e2e`` (end-to-end rows, loopback load test) -> table, JSON, plot."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Run as a file (``python export/bench.py``): this folder would shadow the ``export`` package on
# sys.path, so the same code runs as the installed package's module instead (``python -m export.bench``).
if __name__ == "__main__" and not __package__:
    _opts = sys.orig_argv[1 : len(sys.orig_argv) - len(sys.argv)]  # interpreter options (-u, -X ...)
    os.execv(sys.executable, [sys.executable, *_opts, "-m", "export.bench", *sys.argv[1:]])

DEFAULT_BACKENDS = "torch,onnxruntime,tensorrt"
ALL_BACKENDS = ("torch", "compile", "aoti", "onnxruntime", "tensorrt")


def _ints(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {s!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {s!r}")
    return v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Benchmark an exported NextLocMoE on several backends.")
    ap.add_argument("--engines", required=True, help="engine folder written by export/export.py")
    ap.add_argument("--backends", default=DEFAULT_BACKENDS, help=f"comma list of {','.join(ALL_BACKENDS)}")
    ap.add_argument("--batch-sizes", type=_ints, default=[1, 8, 64])
    ap.add_argument("--out", required=True, help="bench.json to write")
    ap.add_argument("--plot", default=None, help="PNG: latency vs batch per backend")
    ap.add_argument("--warmup-s", type=float, default=1.0, help="warm-up seconds per cell")
    ap.add_argument("--budget-s", type=float, default=3.0, help="timed seconds per (backend, batch) cell")
    ap.add_argument(
        "--no-e2e", action="store_true", help="skip the end-to-end rows (raw request -> venue ids)"
    )
    ap.add_argument(
        "--load-clients", type=int, default=0, help="loopback load test: concurrent clients (0: off)"
    )
    ap.add_argument("--load-seconds", type=float, default=5.0, help="loopback load test duration")
    args = ap.parse_args(argv)
    args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in args.backend_list if b not in ALL_BACKENDS]
    if bad:
        ap.error(f"unknown backend(s) {bad}; choose from {','.join(ALL_BACKENDS)}")
    if not (Path(args.engines) / "frozen.json").is_file():
        ap.error(f"{args.engines}: not an engine folder (no frozen.json; run export/export.py first)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from export.timing import format_table, plot, run_bench

    try:
        result = run_bench(args.engines, args.backend_list, args.batch_sizes, args.warmup_s, args.budget_s)
    except (OSError, ValueError) as e:  # unreadable engine folder, inputs that do not fit the engine
        print(f"bench: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    try:
        add_serving_rows(result, args)
    except (OSError, ValueError, RuntimeError) as e:  # an engine folder without serving files, a server error
        print(f"bench: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(format_table(result))
    for r in result.get("e2e_rows", []):
        where = f"e2e {r['backend']:<12} {r['path']:<6} batch {r['batch']:>4}"
        print(
            f"{where}  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  graph {r['graph_p50_ms']:.3f} ms"
        )
    if "e2e_vs_graph_batch1" in result:
        print(f"end-to-end / graph-only p50 at batch 1: {result['e2e_vs_graph_batch1']}")
    if "load_test" in result:
        print(f"load test: {json.dumps(result['load_test'])}")
    if args.plot:
        plot(result, args.plot)
        print(f"plot: {args.plot}")
    return 0


def add_serving_rows(result: dict, args: argparse.Namespace) -> None:
    """End-to-end rows beside the graph rows, and the loopback load test (export/e2e.py)."""
    from export.e2e import e2e_ratio, load_test, run_e2e, synthetic_users

    if not args.no_e2e:
        rows, skipped = run_e2e(
            Path(args.engines), args.backend_list, args.batch_sizes, args.warmup_s, args.budget_s
        )
        result["e2e_rows"], result["e2e_skipped"] = rows, skipped
        result["e2e_vs_graph_batch1"] = e2e_ratio(result["rows"], rows)
    if args.load_clients > 0:
        from nextlocmoe.serve.engine import load_engine

        eng = load_engine(args.engines)
        users = synthetic_users(eng.venues, 64, int(eng.windows["pointer"]))
        result["load_test"] = load_test(Path(args.engines), users, args.load_clients, args.load_seconds)


if __name__ == "__main__":
    sys.exit(main())
