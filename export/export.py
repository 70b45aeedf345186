"""Entry: ``python export/export.py --run RUN_DIR --out ENGINE_DIR [--format onnx,tensorrt]
[--precision fp32|fp16|bf16]`` (docs/CONTRACT.md "export"). Parse -> ``export.pipeline.run_export``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Run as a file (``python export/export.py``): this folder would shadow the ``export`` package on
# sys.path, so the same code runs as the installed package's module instead (``python -m export.export``).
if __name__ == "__main__" and not __package__:
    _opts = sys.orig_argv[1 : len(sys.orig_argv) - len(sys.argv)]  # interpreter options (-u, -X ...)
    os.execv(sys.executable, [sys.executable, *_opts, "-m", "export.export", *sys.argv[1:]])

FORMATS = ("onnx", "tensorrt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Freeze a trained NextLocMoE run and export it (ONNX, TensorRT)."
    )
    ap.add_argument("--run", required=True, help="training run folder (config.yaml + checkpoints/)")
    ap.add_argument("--out", required=True, help="engine folder to write")
    ap.add_argument("--format", default="onnx", help="comma list of onnx,tensorrt (onnx is always built)")
    ap.add_argument(
        "--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="TensorRT precision"
    )
    ap.add_argument("--n-check", type=int, default=128, help="held-out samples for the parity check")
    ap.add_argument("--topk", type=int, default=20, help="candidates returned by the engine")
    ap.add_argument(
        "--expert-compute",
        default="masked",
        choices=("masked", "folded", "shared"),
        help="static-shape expert compute (model/experts.py); shared = masked (older name)",
    )
    ap.add_argument(
        "--fallback-checkpoint",
        action="store_true",
        help="if the run's newest complete checkpoint cannot be read, export the newest one that can",
    )
    args = ap.parse_args(argv)
    args.formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    bad = [f for f in args.formats if f not in FORMATS]
    if bad:
        ap.error(f"unknown --format {bad}; choose from {','.join(FORMATS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # per-initializer dedup chatter
    logging.getLogger("onnxscript").setLevel(logging.WARNING)  # rewriter rule chatter
    from export.pipeline import run_export

    try:
        report = run_export(
            args.run,
            args.out,
            args.formats,
            args.precision,
            args.n_check,
            args.topk,
            args.expert_compute,
            args.fallback_checkpoint,
        )
    except (OSError, ValueError) as e:  # RunError, CheckpointReadError, DataError: ValueErrors
        print(f"export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    o = report["onnx"]
    print(f"onnx: max_abs_diff={o['max_abs_diff']:.2e} top10_agreement={o['top10_agreement']:.3f} "
          f"n_checked={o['n_checked']}  tensorrt: {report['tensorrt'].get('skipped', 'built')}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
