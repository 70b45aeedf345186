"""`nextlocmoe` command line: thin argument parsing around the library (prepare, evaluate).

Library code raises `DataError` for bad input; `main` prints it as one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from nextlocmoe.data.parsing import DataError

log = logging.getLogger("nextlocmoe")
METRIC_COLUMNS = ("hit@1", "hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "mrr", "mean_distance_m")


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    from nextlocmoe.data.prepare import DATASETS

    p = sub.add_parser(
        "prepare",
        help="build the sample store from a raw data set",
        description="Read a data set, build history/current windows and splits, write DIR.",
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--source", required=True, type=Path, help="data folder (or CSV file for --dataset csv)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--history", type=int, default=40, help="H: history records per sample (default 40)")
    p.add_argument("--current", type=int, default=5, help="C: current-window records per sample (default 5)")
    p.add_argument(
        "--min-history", type=int, default=1, help="minimum history records per sample (default 1)"
    )
    p.add_argument("--duration-cap-min", type=float, default=1440.0, help="cap on durations, minutes")
    p.add_argument(
        "--reference-poi",
        type=Path,
        default=None,
        help="llmmob-fsq-nyc: venue table for coordinate recovery (default: ../fsq-nyc/NYC_POI.npy)",
    )
    g = p.add_argument_group("csv columns (--dataset csv)")
    for name, default in [
        ("user", "user"),
        ("venue", "venue"),
        ("time", None),
        ("lat", None),
        ("lon", None),
        ("category", None),
        ("weekday", None),
        ("hour", None),
        ("order", None),
        ("duration", None),
    ]:
        g.add_argument(
            f"--{name}-col",
            default=default,
            help=f"{name} column" + (f" (default {default})" if default else ""),
        )
    g.add_argument("--timezone", default=None, help="IANA zone for weekday/hour of UTC timestamps")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from nextlocmoe.data.csvsource import CsvSpec
    from nextlocmoe.data.prepare import prepare

    spec = CsvSpec(
        user_col=args.user_col,
        venue_col=args.venue_col,
        time_col=args.time_col,
        lat_col=args.lat_col,
        lon_col=args.lon_col,
        category_col=args.category_col,
        weekday_col=args.weekday_col,
        hour_col=args.hour_col,
        order_col=args.order_col,
        duration_col=args.duration_col,
        timezone=args.timezone,
    )
    t0 = time.perf_counter()
    m = prepare(
        args.dataset,
        args.source,
        args.out,
        args.history,
        args.current,
        args.min_history,
        args.duration_cap_min,
        spec if args.dataset == "csv" else None,
        args.reference_poi,
    )
    dropped = {k: v for k, v in m["dropped"].items() if v}
    print(
        f"prepared {m['dataset']} -> {args.out} in {time.perf_counter() - t0:.1f} s: "
        f"{m['input_rows']} rows, {m['records']} kept, dropped {dropped or 'none'}; {m['users']} users, "
        f"{m['locations']} locations; samples {m['samples']}; coordinates: {m['coordinate_units']}"
    )
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate baselines (and, later, a trained run) on one split",
        description="Rank all known locations for each sample; hit@k, ndcg@k, mrr, distance.",
    )
    p.add_argument("--data", type=Path, help="prepared data folder (from `nextlocmoe prepare`)")
    p.add_argument("--run", type=Path, help="training run folder (model evaluation)")
    p.add_argument("--baselines-only", action="store_true", help="evaluate only the non-learned baselines")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--max-samples", type=int, default=0, help="evaluate the model on the first N samples")
    p.add_argument("--ranking", choices=("point", "scored"), help="headline ranking (default: the run's)")
    p.add_argument("--batch-size", type=int, default=0, help="evaluation batch (default: the run's)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from nextlocmoe.eval.baselines import baseline_report

    if args.baselines_only or args.run is None:
        if args.data is None:
            raise DataError("evaluate --baselines-only needs --data DIR")
        report = baseline_report(args.data, args.split, progress=not args.quiet)
    else:
        from nextlocmoe.eval.evaluate import evaluate_run

        report = evaluate_run(
            args.run, args.data, args.split, args.ranking, args.max_samples, args.batch_size
        )
    print(format_table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def format_table(report: dict) -> str:
    """Plain-text table: one row per ranker (model keys at the top level, then each baseline)."""
    rows = []
    if "hit@1" in report:
        rows.append(("model", report))
    rows += list(report.get("baselines", {}).items())
    head = f"{'split=' + report['split'] + ' n=' + str(report['n']):<26}" + "".join(
        f"{c:>16}" for c in METRIC_COLUMNS
    )
    lines = [head]
    for name, m in rows:
        cells = "".join(f"{_fmt(m.get(c)):>16}" for c in METRIC_COLUMNS)
        lines.append(f"{name:<26}{cells}")
    return "\n".join(lines)


def _fmt(v: float | int | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) and abs(v) >= 10 else f"{v:.4f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextlocmoe", description="NextLocMoE data, evaluation and tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_evaluate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nextlocmoe` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (DataError, ValueError, RuntimeError) as e:  # RunError, ConfigError are ValueErrors
        print(f"nextlocmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"nextlocmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
