"""Issue 18 acceptance on 2 CPU ranks (gloo, real DeepSpeed bf16, the demo's fsq-nyc data):

- 20 steps with ``train.precision=bf16`` in both MoE modes (expert ep_size=2 / replicated) and replicated
  with ZeRO-3: losses finite and falling; ``--resume`` continues the curve; export parity of the bf16 runs;
- the in-training final evaluation (sharded over the 2 ranks, bf16) equals ``nextlocmoe evaluate`` in one
  process, and ``nextlocmoe evaluate`` under torchrun on 2 ranks equals it too (exact merge);
- ZeRO-3 in replicated mode (ds_configs/zero3.json) trains the same fp32 losses as ZeRO-2.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.distributed.test_cluster_modes import losses, run, torchrun2

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
STEPS, HALF, EVAL_N = 20, 10, 600
MODES = {
    "expert": ["train.moe_parallel=expert", "train.ep_size=2"],
    "replicated": ["train.moe_parallel=replicated"],
    "zero3": ["train.moe_parallel=replicated", "train.zero_stage=3"],
}
DS = {"expert": "zero2", "replicated": "zero2", "zero3": "zero3"}
NEXTLOCMOE = [sys.executable, "-m", "nextlocmoe.cli"]


def job(nyc: Path, out: Path, mode: str, precision: str, *extra: str) -> list[str]:
    return ["train/train.py", "--config", "configs/debug.yaml", "--deepspeed", f"ds_configs/{DS[mode]}.json",
            *MODES[mode], f"train.precision={precision}", f"train.steps={STEPS}", "train.log_every=1",
            f"train.ckpt_every={HALF}", "data.batch_size=8", f"data.dir={nyc}", f"train.out_dir={out}",
            f"train.name={mode}", f"train.max_eval_samples={EVAL_N}", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def bf16_runs(nyc: Path, tmp_path_factory) -> Path:
    """Both modes and ZeRO-3 in bf16; the replicated run evaluates at the end (sharded, bf16)."""
    out = tmp_path_factory.mktemp("bf16")
    for mode in MODES:
        run(torchrun2(*job(nyc, out, mode, "bf16", *([] if mode == "replicated" else ["--no-eval"]))))
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_bf16_trains_finite_and_falling(bf16_runs: Path, mode: str) -> None:
    got = losses(bf16_runs / mode)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in got.values()), got
    first, last = sum(got[s] for s in range(1, 6)) / 5, sum(got[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < 0.9 * first, (first, last)
    print(f"bf16 {mode}: mean loss steps 1-5 {first:.0f} -> steps 16-20 {last:.0f}")


def test_bf16_modes_agree(bf16_runs: Path) -> None:
    """expert (DeepSpeed all-to-all) vs replicated (shared-base compute) in bf16: the same curve up to bf16
    rounding (fp32 agreement is 1e-5: test_cluster_modes.py)."""
    a, b = losses(bf16_runs / "expert"), losses(bf16_runs / "replicated")
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    assert worst < 0.02, worst


@pytest.mark.parametrize("mode", ["expert", "replicated"])
def test_bf16_resume_continues_the_curve(bf16_runs: Path, nyc: Path, tmp_path: Path, mode: str) -> None:
    shutil.copytree(bf16_runs / mode, tmp_path / mode)
    shutil.rmtree(tmp_path / mode / "checkpoints" / f"step{STEPS}")  # as if killed after step HALF's save
    run(torchrun2(*job(nyc, tmp_path, mode, "bf16", "--no-eval", "--resume")))
    ref, got = losses(bf16_runs / mode), losses(tmp_path / mode)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(HALF + 1, STEPS + 1):  # bit-identical on CPU (FACTS.md: resume, bf16 included)
        assert got[s] == pytest.approx(ref[s], rel=1e-6), s


@pytest.mark.parametrize("mode", ["expert", "replicated", "zero3"])
def test_bf16_runs_export_with_parity(bf16_runs: Path, tmp_path: Path, mode: str) -> None:
    eng = tmp_path / "engines"
    run([sys.executable, "export/export.py", "--run", str(bf16_runs / mode), "--out", str(eng), "--format",
         "onnx", "--n-check", "16"])  # fmt: skip
    onnx = json.loads((eng / "export_report.json").read_text())["onnx"]
    assert onnx["n_checked"] == 16 and onnx["max_abs_diff"] <= 1e-4 and onnx["top10_agreement"] >= 0.99, onnx


def _figures(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("ranks", "run", "device")}


def test_sharded_evaluation_equals_one_process(bf16_runs: Path, tmp_path: Path) -> None:
    """The in-training final eval (2 ranks, bf16) == `nextlocmoe evaluate` in one process == the same
    command under torchrun on 2 ranks (the documented cluster command)."""
    rd = bf16_runs / "replicated"
    trained = json.loads((rd / "eval.json").read_text())
    assert trained["ranks"] == 2 and trained["precision"] == "bf16" and trained["n"] == EVAL_N
    common = ["evaluate", "--run", str(rd), "--max-samples", str(EVAL_N), "--precision", "bf16", "--quiet"]
    run([*NEXTLOCMOE, *common, "--out", str(tmp_path / "one.json")])
    run(torchrun2("--no-python", "--", sys.executable, "-m", "nextlocmoe.cli", *common,
                  "--out", str(tmp_path / "two.json")))  # fmt: skip
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["ranks"] == 1 and two["ranks"] == 2
    assert _figures(one) == _figures(two) == _figures(trained)
    assert one["rankings"]["scored"]["hit@1"] > 0  # a real evaluation, not an empty one


def test_zero3_replicated_matches_zero2_in_fp32(nyc: Path, tmp_path: Path) -> None:
    for mode in ("replicated", "zero3"):
        run(torchrun2(*job(nyc, tmp_path, mode, "fp32", "--no-eval", "train.steps=6", "train.ckpt_every=6")))
    a, b = losses(tmp_path / "replicated"), losses(tmp_path / "zero3")
    assert a == pytest.approx(b, rel=1e-6) and len(a) == 6
    assert (tmp_path / "zero3" / "checkpoints" / "step6" / "model_state.pt").is_file()  # consolidated
