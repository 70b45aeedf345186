"""Model cost against the number of known places L (issue 20, docs/SCALE.md): train step, evaluation and
engine latency with peak memory, for the full-scoring and the retrieval pointer head.

    python scripts/scale_model_bench.py --locations 1e4 1e6 --heads retrieval full --out scale-out/model.json

For each L: max(``--rows``, L) synthetic check-ins (scripts/scale_bench.py's generator: Zipf venues around
one city, the first L rows visiting every venue once so the store knows all L places) are prepared once;
then per head (``model.heads.retrieval`` true / false on the debug flavour):

- **train**: ``--steps`` DeepSpeed steps on 2 CPU ranks (ZeRO-2, ep_size=2, as the demo); the step time is
  the median of metrics.jsonl's ``step_time_s`` windows after the first (warm-up, model build excluded);
- **evaluate**: ``nextlocmoe evaluate --run`` on ``--eval-samples`` test samples (baselines on the same
  samples included), wall time and peak RSS of the process tree;
- **engine**: ``export/export.py --format onnx`` (ONNX file size) and ``export/bench.py`` on ONNX Runtime,
  p50 at batch 1 and 8.

Every command runs as a niced child; the JSON keeps each command, and a plot is written beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_bench import PREPARE, ROOT, generate, measure  # noqa: E402

PY = sys.executable
TRAIN = (
    f"{PY} -m torch.distributed.run --standalone --nproc_per_node 2 train/train.py"
    " --config configs/debug.yaml --deepspeed ds_configs/zero2.json --no-eval train.ep_size=2"
    " train.zero_stage=2 train.steps={steps}"
    " train.log_every=5 train.ckpt_every={steps} train.out_dir={work} train.name={name} data.dir={store}"
    " model.heads.retrieval={retrieval}"
)
EVAL = f"{PY} -m nextlocmoe.cli evaluate --run {{run}} --max-samples {{n}} --quiet --out {{run}}/eval.json"
EXPORT = f"{PY} export/export.py --run {{run}} --out {{eng}} --format onnx"
BENCH = (
    f"{PY} export/bench.py --engines {{eng}} --backends onnxruntime --batch-sizes 1,8 --no-e2e"
    " --out {eng}/bench.json"
)


def step_time(run: Path) -> float | None:
    """Median step time (s) of metrics.jsonl's throughput windows after the first."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    times = [r["step_time_s"] for r in rows if r.get("step_time_s") is not None]
    return statistics.median(times[1:] or times) if times else None


def ort_p50(eng: Path) -> dict[str, float]:
    rows = json.loads((eng / "bench.json").read_text())["rows"]
    return {f"ort_p50_ms_b{r['batch']}": r["p50_ms"] for r in rows if r["backend"] == "onnxruntime"}


def bench_head(store: Path, work: Path, head: str, args: argparse.Namespace) -> dict:
    """Train, evaluate, export and bench one head on one store; the figures of one JSON row."""
    name = f"run_{store.name}_{head}"
    run, eng = work / name, work / f"eng_{store.name}_{head}"
    res: dict = {"head": head}
    cmd = TRAIN.format(steps=args.steps, work=work, name=name, store=store, retrieval=head == "retrieval")
    res["train"] = measure(cmd) | {"command": cmd}
    if res["train"]["rc"] != 0:
        return res
    res["step_time_s"] = step_time(run)
    cmd = EVAL.format(run=run, n=args.eval_samples)
    res["evaluate"] = measure(cmd) | {"command": cmd}
    ev = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
    res["hit1"], res["candidate_recall"] = (
        ev.get("hit@1"),
        ev.get("rankings", {}).get("scored", {}).get("candidate_recall"),
    )
    cmd = EXPORT.format(run=run, eng=eng)
    res["export"] = measure(cmd) | {"command": cmd}
    files = list(eng.glob("model.onnx*"))  # the graph and any external-data file
    res["onnx_mb"] = round(sum(p.stat().st_size for p in files) / 1e6, 1) if files else None
    cmd = BENCH.format(eng=eng)
    res["bench"] = measure(cmd) | {"command": cmd}
    if (eng / "bench.json").is_file():
        res |= ort_p50(eng)
    return res


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("step_time_s", "train step (s)"), ("eval_peak_gb", "evaluate peak RSS (GB)"),
            ("ort_p50_ms_b1", "ORT p50 batch 1 (ms)")]  # fmt: skip
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, (k, label) in zip(axes, keys, strict=True):
        for head in sorted({r["head"] for r in results}):
            pts = [(r["locations"], r.get(k)) for r in results if r["head"] == head and r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=head)
        ax.set_xscale("log"), ax.set_xlabel("known places L"), ax.set_title(label), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--locations", type=float, nargs="+", default=[1e4, 1e6], help="L values")
    ap.add_argument("--rows", type=float, default=1.2e6, help="synthetic check-ins per L (default 1.2M)")
    ap.add_argument("--heads", nargs="+", default=["retrieval", "full"], choices=["retrieval", "full"])
    ap.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--work", type=Path, default=ROOT / "scale-out")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default WORK/model_bench.json)")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.out or args.work / "model_bench.json"
    results = []
    for n_loc in [int(x) for x in args.locations]:
        rows = max(int(args.rows), n_loc)
        src, store = args.work / f"cover_{rows}_L{n_loc}.csv", args.work / f"store_L{n_loc}c"
        if not (store / "manifest.json").is_file():
            if not src.exists():
                generate(src, rows, n_loc, 200, 1.1, 0, cover=True)  # every venue a known place
            measure(PREPARE.format(src=src, out=store, mem=3.0))
        for head in args.heads:
            res = {"locations": n_loc, "rows": rows} | bench_head(store, args.work, head, args)
            ev = res.get("evaluate", {})
            res["eval_peak_gb"] = ev.get("peak_rss_gb")
            results.append(res)
            print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}), flush=True)
            out.write_text(json.dumps({"machine": "shared 2-core box", "results": results}, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
