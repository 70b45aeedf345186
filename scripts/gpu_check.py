"""One-GPU check of the training stack, writing one JSON of figures (docs/TRAINING.md "GPU check").

    python scripts/gpu_check.py --out gpu_check.json [--wheel-dir DIR] [--data ../shared/data]
    python scripts/gpu_check.py --dry-run --out /tmp/dry.json      # CPU, tiny sizes, every step (CI)

Steps, in order (each one's rc, seconds and figures go into the JSON; a failed step makes the exit non-zero,
a step that cannot run here is recorded as ``{"skipped": reason}``):
  env       torch / CUDA / device; DeepSpeed imported, else pip-installed from ``--wheel-dir`` (no index)
  prepare   fsq-nyc -> a sample store
  gpu_tests pytest -m gpu (dry run: collected, skipped without CUDA)
  train_*   bf16 DeepSpeed training of configs/mid.yaml on 1 GPU, train.moe_parallel expert and replicated
            (dry run: configs/debug.yaml, fp32, a few steps)
  resume    the replicated run continued with --resume to more steps (loss curve appended, not restarted)
  export    ONNX export of the replicated run with the parity report
  bench     eager torch, torch.compile and AOTInductor on the GPU, onnxruntime on CPU (dry run: torch +
            onnxruntime, as compile / AOTInductor take minutes on 2 CPU cores)
Budget on a GPU: < 8 minutes (the mid config trains ~200 steps per mode). TensorRT is not installed on
the GPU image: the bench lists it as skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    """Run a command from the repository root; (rc, output tail, seconds)."""
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                           timeout=timeout)  # fmt: skip
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"timeout after {timeout} s: {e}"
    return rc, "\n".join(out.splitlines()[-25:]), round(time.perf_counter() - t, 1)


def ensure_deepspeed(wheel_dir: str | None) -> dict[str, Any]:
    try:
        import deepspeed  # noqa: F401

        return {"deepspeed": deepspeed.__version__, "installed": False}
    except ImportError:
        pass
    if not wheel_dir:
        return {"skipped": "deepspeed not importable and no --wheel-dir given"}
    rc, out, s = sh([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheel_dir,
                     "deepspeed"], 300, {"DS_BUILD_OPS": "0"})  # fmt: skip
    if rc:
        return {"rc": rc, "error": out}
    import importlib

    return {"deepspeed": importlib.import_module("deepspeed").__version__, "installed": True, "s": s}


def last_metrics(run_dir: Path) -> dict[str, Any]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    first = rows[0]
    return {"steps": [first["step"], last["step"]], "first_loss": first["loss"], "last_loss": last["loss"],
            "samples_per_s": last["samples_per_s"], "expert_stats": last.get("expert_stats")}  # fmt: skip


def bench_figures(path: Path) -> dict[str, Any]:
    """bench.json; a requested backend other than TensorRT (not on the GPU image) that was skipped is a
    failure (e.g. torch.compile or AOTInductor broken)."""
    rep = json.loads(path.read_text())
    broken = [s for s in rep["skipped"] if s["backend"] != "tensorrt"]
    if broken:
        raise RuntimeError(f"backends skipped: {broken}")
    return rep


class Check:
    """Runs the steps, collects one JSON, remembers failures."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out, self.failed = args, {"dry_run": args.dry_run, "steps": {}}, []
        self.work = Path(args.work)
        self.env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        if args.dry_run:
            self.env["DS_ACCELERATOR"] = "cpu"

    def step(self, name: str, cmd: list[str], timeout: float, figures=None) -> bool:
        rc, tail, s = sh(cmd, timeout, self.env)
        rec: dict[str, Any] = {"rc": rc, "s": s}
        if rc == 0 and figures is not None:
            try:
                rec.update(figures())
            except Exception as e:  # noqa: BLE001 - a step whose outputs are broken is a failed step
                rec.update(rc=1, error=f"outputs unreadable: {e}")
        if rec["rc"] != 0:
            rec["tail"] = tail
            self.failed.append(name)
        self.out["steps"][name] = rec
        print(f"gpu_check: {name}: rc={rec['rc']} in {s} s", flush=True)
        return rec["rc"] == 0

    def skip(self, name: str, reason: str) -> None:
        self.out["steps"][name] = {"skipped": reason}
        print(f"gpu_check: {name}: skipped ({reason})", flush=True)

    def train_cmd(self, mode: str, steps: int, *extra: str) -> list[str]:
        a = self.args
        cfg, prec = ("configs/debug.yaml", "fp32") if a.dry_run else ("configs/mid.yaml", "bf16")
        ds = "ds_configs/zero2.json" if a.dry_run else "ds_configs/gpu_bf16.json"
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                "train/train.py", "--config", cfg, "--deepspeed", ds, *extra, f"train.moe_parallel={mode}",
                f"train.precision={prec}", f"train.steps={steps}", f"train.log_every={max(1, steps // 10)}",
                f"train.ckpt_every={steps}", f"train.max_eval_samples={a.eval_samples}",
                f"data.dir={self.work / 'data'}", f"train.out_dir={self.work / 'runs'}",
                f"train.name={mode}"]  # fmt: skip


def run_all(c: Check) -> None:
    a = c.args
    import torch

    cuda = torch.cuda.is_available()
    c.out["env"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
                    "device": torch.cuda.get_device_name(0) if cuda else "cpu"}  # fmt: skip
    if not cuda and not a.dry_run:
        raise SystemExit("gpu_check: error: no CUDA device (use --dry-run on CPU)")
    ds = ensure_deepspeed(a.wheel_dir)
    c.out["steps"]["deepspeed"] = ds
    if "rc" in ds or ("skipped" in ds and a.dry_run):
        c.failed.append("deepspeed")
    data = c.work / "data"
    c.step("prepare", [sys.executable, "-m", "nextlocmoe.cli", "prepare", "--dataset", "fsq-nyc", "--source",
                       str(Path(a.data) / "fsq-nyc"), "--out", str(data)], 300)  # fmt: skip
    c.step("gpu_tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/unit/test_gpu.py"], 300)
    steps = 3 if a.dry_run else a.steps
    for mode in ("expert", "replicated"):
        if "deepspeed" in c.failed or "skipped" in ds:
            c.skip(f"train_{mode}", "no DeepSpeed")
            continue
        run_dir = c.work / "runs" / mode
        c.step(f"train_{mode}", c.train_cmd(mode, steps, "--no-eval"), 900, lambda r=run_dir: last_metrics(r))
    rep = c.work / "runs" / "replicated"
    if (rep / "metrics.jsonl").is_file():
        c.step(
            "resume",
            c.train_cmd("replicated", steps + max(1, steps // 2), "--resume"),
            900,
            lambda: {**last_metrics(rep), "eval": json.loads((rep / "eval.json").read_text())["hit@1"]},
        )
        eng = c.work / "engines"
        ok = c.step("export", [sys.executable, "export/export.py", "--run", str(rep), "--out", str(eng),
                               "--format", "onnx,tensorrt", "--n-check", "16" if a.dry_run else "64"], 600,
                    lambda: json.loads((eng / "export_report.json").read_text()))  # fmt: skip
        backends = "torch,onnxruntime" if a.dry_run else "torch,compile,aoti,onnxruntime,tensorrt"
        bench = c.work / "bench.json"
        if ok:
            dry = a.dry_run
            cmd = [sys.executable, "export/bench.py", "--engines", str(eng), "--backends", backends,
                   "--batch-sizes", "1,8" if dry else "1,8,64", "--budget-s", "0.3" if dry else "2",
                   "--warmup-s", "0.2" if dry else "1", "--out", str(bench)]  # fmt: skip
            c.step("bench", cmd, 900, lambda: bench_figures(bench))
    else:
        c.skip("resume", "no replicated run")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON of figures to write")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: exercise every step (CI)")
    ap.add_argument("--wheel-dir", default=None, help="folder with a deepspeed wheel (pip --no-index)")
    ap.add_argument("--data", default=os.environ.get("NEXTLOCMOE_DATA", "../shared/data"))
    ap.add_argument("--work", default=None, help="scratch folder (default: beside --out)")
    ap.add_argument("--steps", type=int, default=200, help="training steps per mode on the GPU")
    ap.add_argument("--eval-samples", type=int, default=2000, help="test samples of the final evaluation")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.eval_samples = min(args.eval_samples, 64)
    args.work = args.work or str(Path(args.out).resolve().parent / "gpu_check_work")
    t0 = time.perf_counter()
    c = Check(args)
    try:
        run_all(c)
    finally:
        c.out["total_s"] = round(time.perf_counter() - t0, 1)
        c.out["failed"] = c.failed
        Path(args.out).write_text(json.dumps(c.out, indent=1))
    print(f"gpu_check: {'FAILED ' + ','.join(c.failed) if c.failed else 'all steps passed'}; {args.out}")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
