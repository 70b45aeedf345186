"""Export + ONNX parity from REAL DeepSpeed training checkpoints (issue 5 acceptance): an ep_size=2 run on
2 CPU ranks with threshold routing and an ep_size=1 run on 1 rank with top-k routing, each exported by
export/export.py and checked against eager PyTorch on held-out samples of other batch sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], timeout: int = 400) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]


@pytest.mark.parametrize(("nproc", "ep", "routing"), [(2, 2, "threshold"), (1, 1, "topk")])
def test_export_parity_from_training_checkpoint(tmp_path: Path, nyc: Path, nproc: int, ep: int, routing: str):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
          "train/train.py", "--config", "configs/debug.yaml", "--deepspeed", "ds_configs/zero2.json",
          "--no-eval", f"train.ep_size={ep}", "train.steps=4", "train.log_every=2", "data.batch_size=8",
          f"model.personal_moe.routing={routing}", f"data.dir={nyc}", f"train.out_dir={tmp_path}",
          "train.name=run"])  # fmt: skip
    ckpt = tmp_path / "run" / "checkpoints" / "step4"
    assert (ckpt / "COMPLETE").is_file()
    assert len(list(ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 4  # per-expert files
    eng = tmp_path / "engines"
    _run([sys.executable, "export/export.py", "--run", str(tmp_path / "run"), "--out", str(eng),
          "--format", "onnx", "--n-check", "24"])  # fmt: skip
    onnx = json.loads((eng / "export_report.json").read_text())["onnx"]
    assert onnx["n_checked"] == 24 and onnx["opset"] == 18
    assert onnx["max_abs_diff"] <= 1e-4 and onnx["top10_agreement"] >= 0.99, onnx
