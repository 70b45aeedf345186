"""scripts/gpu_check.py: its CPU --dry-run exercises every step at tiny size and passes; a broken step makes
it exit non-zero (CI runs this; the GPU run itself is never a CI dependency)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

STEPS = ("prepare", "gpu_tests", "train_expert", "train_replicated", "resume", "export", "bench")


def test_a_broken_step_fails_loudly(tmp_path: Path) -> None:
    from gpu_check import Check

    c = Check(argparse.Namespace(dry_run=True, work=str(tmp_path)))
    assert c.step("good", [sys.executable, "-c", "pass"], 60)
    assert not c.step("broken", [sys.executable, "-c", "raise SystemExit(3)"], 60)
    assert not c.step("bad_outputs", [sys.executable, "-c", "pass"], 60, lambda: json.loads("{"))
    assert c.failed == ["broken", "bad_outputs"] and c.out["steps"]["broken"]["rc"] == 3


@pytest.mark.integration
@pytest.mark.slow
def test_dry_run_passes_every_step(tmp_path: Path) -> None:
    if not (SHARED_DATA / "fsq-nyc").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    out = tmp_path / "dry.json"
    env = {**os.environ, "NEXTLOCMOE_DATA": str(SHARED_DATA)}
    p = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rep = json.loads(out.read_text())
    assert rep["failed"] == [] and rep["dry_run"]
    for name in STEPS:
        assert rep["steps"][name]["rc"] == 0, (name, rep["steps"][name])
    assert rep["steps"]["resume"]["steps"][1] > rep["steps"]["train_replicated"]["steps"][1]
    assert rep["steps"]["export"]["onnx"]["max_abs_diff"] <= 1e-4
    assert {r["backend"] for r in rep["steps"]["bench"]["rows"]} >= {"torch", "onnxruntime"}
