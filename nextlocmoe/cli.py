"""`nextlocmoe` command line: thin argument parsing around the library (prepare, evaluate, ...; predict
and serve live in nextlocmoe/serve/cli.py).

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
    from nextlocmoe.data.prepare import DATASETS, ENGINES

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
    p.add_argument(
        "--memory-gb", type=float, default=3.0,
        help="memory budget of the streaming prepare, whatever the row count (default 3; docs/DATA.md)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="cores for the prepare engine (default 0 = all)")
    p.add_argument(
        "--engine", choices=ENGINES, default="duckdb",
        help="duckdb (one machine, default) or spark (the same store; docs/DATA.md for a cluster)",
    )  # fmt: skip
    p.add_argument(
        "--spark-master", default=None,
        help="--engine spark: master URL, e.g. local[2] (default: spark-submit's, else local[*])",
    )  # fmt: skip
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
    g.add_argument(
        "--force-coordinates", action="store_true",
        help="keep coordinates that look swapped or projected (refused by default; docs/DATA.md)",
    )  # fmt: skip
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
        force_coordinates=args.force_coordinates,
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
        memory_gb=args.memory_gb,
        threads=args.threads,
        engine=args.engine,
        spark_master=args.spark_master,
    )
    dropped = {k: v for k, v in m["dropped"].items() if v}
    print(
        f"prepared {m['dataset']} -> {args.out} in {time.perf_counter() - t0:.1f} s: "
        f"{m['input_rows']} rows, {m['records']} kept, dropped {dropped or 'none'}; {m['users']} users, "
        f"{m['locations']} locations; samples {m['samples']}; coordinates: {m['coordinate_system']}"
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
    p.add_argument(
        "--ranking", choices=("point", "scored", "codes"), help="headline ranking (default: the run's)"
    )
    p.add_argument(
        "--task", choices=("next", "recovery"), default="next",
        help="next-location prediction (default) or mobility recovery: one masked current record (QTMOB.md)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=0, help="evaluation batch (default: the run's)")
    p.add_argument(
        "--device", default="auto",
        help="auto (CUDA device LOCAL_RANK if any, else cpu), cpu, cuda or cuda:N; under torchrun / srun "
        "the batches are sharded over the ranks and merged exactly on rank 0 (docs/TRAINING.md)",
    )  # fmt: skip
    p.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32",
        help="parameters in bf16 as under DeepSpeed bf16 (routers, heads, metrics stay fp32)",
    )  # fmt: skip
    p.add_argument(
        "--normalise",
        choices=("target", "source"),
        default="target",
        help="with --run and another --data set (zero-shot): coordinate/duration stats of the target data "
        "set (default) or of the run's training data set (docs/EXPLAIN.md)",
    )
    p.add_argument(
        "--fallback-checkpoint",
        action="store_true",
        help="if the run's newest complete checkpoint cannot be read, use the newest one that can",
    )
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from nextlocmoe.eval.baselines import baseline_report

    if args.baselines_only or args.run is None:
        if args.data is None:
            raise DataError("evaluate --baselines-only needs --data DIR")
        if args.task == "recovery":
            from nextlocmoe.tokens.recovery import recovery_baselines

            base = recovery_baselines(args.data, args.split, args.max_samples)
            report = {"split": args.split, "task": "recovery", "n": base["markov"]["n"], "baselines": base}
        else:
            report = baseline_report(args.data, args.split, progress=not args.quiet)
    else:
        report = _evaluate_run(args)
        if report is None:  # a rank other than 0 of a sharded evaluation: rank 0 reports
            return 0
    print(format_table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _evaluate_run(args: argparse.Namespace) -> dict | None:
    """A run on its own data set: on ``--device``, sharded over the ranks of a torchrun / srun launch
    (nextlocmoe/eval/sharded.py); on another data set (zero-shot): one process."""
    from nextlocmoe.eval.sharded import ensure_process_group, evaluate_run_sharded, placement_from_env

    place = placement_from_env(args.device)
    zero_shot = args.task == "next" and (args.data is not None or args.normalise != "target")
    if zero_shot:  # any data set, zero-shot included
        if place.world > 1:
            raise DataError(
                "evaluate --data / --normalise (zero-shot) runs in one process, not under torchrun"
            )
        from nextlocmoe.eval.zeroshot import evaluate_transfer

        return evaluate_transfer(
            args.run, args.data or _run_data(args.run), args.split, args.ranking, args.max_samples,
            args.batch_size, args.normalise, args.fallback_checkpoint,
        )  # fmt: skip
    started = ensure_process_group(place)
    try:
        return evaluate_run_sharded(
            args.run, place, args.data, args.split, args.ranking, args.max_samples, args.batch_size,
            args.task, args.precision, args.fallback_checkpoint,
        )  # fmt: skip
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


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


def _run_data(run: Path) -> str:
    from nextlocmoe.model.io import load_run_config

    return load_run_config(run).data.dir


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="routing report of a trained run: persona/function expert mixes, load, stability, plots",
        description="Run the model over samples and explain its routing (docs/EXPLAIN.md): summary.json "
        "and PNG plots in --out; category agreement where the data has venue categories.",
    )
    p.add_argument("--run", required=True, type=Path, help="training run folder (any ep_size)")
    p.add_argument("--data", type=Path, help="prepared data folder (default: the run's)")
    p.add_argument("--out", required=True, type=Path, help="report folder (created)")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--max-samples", type=int, default=2000, help="evenly spaced samples (0 = all)")
    p.add_argument("--batch-size", type=int, default=0, help="batch (default: the run's eval batch)")
    p.add_argument(
        "--pool", choices=("current", "valid", "last"), default="current",
        help="persona-MoE token positions pooled per sample (default: the current window)",
    )  # fmt: skip
    p.add_argument("--top-users", type=int, default=30, help="users in the heatmap (most samples first)")
    p.add_argument("--normalise", choices=("target", "source"), default="target", help="as in evaluate")
    p.add_argument(
        "--fallback-checkpoint",
        action="store_true",
        help="if the run's newest complete checkpoint cannot be read, use the newest one that can",
    )
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    from nextlocmoe.eval.explain import explain_run

    t0 = time.perf_counter()
    rep = explain_run(
        args.run, args.data, args.out, args.split, args.max_samples, args.batch_size, args.pool,
        args.top_users, args.normalise, args.fallback_checkpoint,
    )  # fmt: skip
    for li, st in enumerate(rep["overall"]["persona"]):
        print(f"persona layer {li}: load {[round(x, 3) for x in st['load']]} cv {st['load_cv']:.3f} "
              f"entropy {st['entropy']:.3f} stability_js {st['stability_js']}")  # fmt: skip
    fn = rep["overall"]["function"]
    if fn:
        print(f"function: load {[round(x, 3) for x in fn['load']]} cv {fn['load_cv']:.3f} "
              f"entropy {fn['entropy']:.3f}")  # fmt: skip
    agr = rep["category_agreement"]
    if "agreement" in agr:
        print(f"category agreement {agr['agreement']:.4f} (n={agr['n_records']}; random 1/5 = 0.2, seeded "
              f"{agr['random_seeded']:.4f}; popularity group {agr['popularity_group']:.4f}, model's top "
              f"expert {agr['popularity_model_expert']:.4f})")  # fmt: skip
    print(f"wrote {args.out}/summary.json and {sorted(rep['plots'].values())} "
          f"({rep['n_samples']} samples, {time.perf_counter() - t0:.1f} s)")  # fmt: skip
    return 0


def _add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="train the QT-Mob location tokenizer (RQ-VAE) on a prepared data set",
        description="Write DIR/location_codes.json (a unique code tuple per location) and "
        "DIR/tokenizer_report.json (docs/QTMOB.md).",
    )
    p.add_argument("--data", required=True, type=Path, help="prepared data folder (`nextlocmoe prepare`)")
    p.add_argument("--levels", type=int, default=4, help="residual quantisation levels (default 4)")
    p.add_argument("--codebook", type=int, default=64, help="codes per level (default 64)")
    p.add_argument("--code-dim", type=int, default=32, help="code vector width (default 32)")
    p.add_argument("--epochs", type=int, default=60, help="training epochs over all locations (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed (the codes are deterministic under it)")
    p.set_defaults(func=_cmd_tokenize)


def _cmd_tokenize(args: argparse.Namespace) -> int:
    if args.levels < 1 or args.codebook < 2 or args.epochs < 1 or args.code_dim < 1:
        raise DataError("tokenize: --levels >= 1, --codebook >= 2, --epochs >= 1, --code-dim >= 1")
    from nextlocmoe.tokens.rqvae import TokenizerSettings, tokenize

    s = TokenizerSettings(levels=args.levels, codebook=args.codebook, d_code=args.code_dim,
                          epochs=args.epochs, seed=args.seed)  # fmt: skip
    r = tokenize(args.data, s, log=log.info)
    print(f"tokenized {r['locations']} locations -> {args.data}/location_codes.json in {r['seconds']:.1f} s:"
          f" {r['levels']} levels (extra collision level: {r['extra_level']}), collisions resolved "
          f"{r['collisions_resolved']}, code usage {r['code_usage']}, mse {r['recon_mse']:.4f}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextlocmoe", description="NextLocMoE data, evaluation and tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_evaluate(sub)
    _add_explain(sub)
    _add_tokenize(sub)
    from nextlocmoe.serve.cli import add_predict, add_serve

    add_predict(sub)
    add_serve(sub)
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
    except (DataError, ValueError, RuntimeError, OSError) as e:  # RunError, ConfigError: ValueErrors
        print(f"nextlocmoe {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def one_line(e: BaseException) -> str:
    """An exception as one line (multi-line library messages folded)."""
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
