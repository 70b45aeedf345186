"""export/export.py + export/bench.py end to end on a debug run over the shipped NYC data (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[2]
NYC = SHARED_DATA / "fsq-nyc"

pytestmark = [pytest.mark.integration]


def _fake_run(data_dir: Path, run_dir: Path, overrides: tuple[str, ...] = ()) -> None:
    """A run folder as training writes it (config.yaml + a complete consolidated checkpoint), with
    perturbed LoRA/router weights so experts differ (no training needed)."""
    from nextlocmoe.config import load_config, save_config
    from nextlocmoe.model.build import build_model
    from nextlocmoe.model.io import CONSOLIDATED, data_info_from_dir

    cfg = load_config(ROOT / "configs" / "debug.yaml", [f"data.dir={data_dir}", *overrides])
    model = build_model(cfg.model, data_info_from_dir(data_dir))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("_B" in n or "router" in n):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = run_dir / "checkpoints" / "step1"
    ckpt.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    torch.save(model.state_dict(), ckpt / CONSOLIDATED)
    (ckpt / "COMPLETE").write_text("")


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # ~60 s on 2 cores: prepare + ONNX export of the debug model + a short bench
@pytest.mark.skipif(not NYC.is_dir(), reason=f"{NYC} not present")
def test_export_and_bench_debug_run(tmp_path: Path) -> None:
    data, run, eng = tmp_path / "data", tmp_path / "run", tmp_path / "engines"
    p = _run(
        ["-m", "nextlocmoe.cli", "prepare", "--dataset", "fsq-nyc", "--source", str(NYC), "--out", str(data)]
    )
    assert p.returncode == 0, p.stderr[-2000:]
    _fake_run(data, run)
    p = _run(
        [
            "export/export.py",
            "--run",
            str(run),
            "--out",
            str(eng),
            "--format",
            "onnx,tensorrt",
            "--n-check",
            "24",
        ]
    )
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((eng / "export_report.json").read_text())
    onnx = report["onnx"]
    assert {"path", "opset", "max_abs_diff", "top10_agreement", "n_checked"} <= set(onnx)
    assert onnx["opset"] == 18 and onnx["n_checked"] == 24 and 2 not in onnx["batch_sizes"]
    assert onnx["max_abs_diff"] <= 1e-4 and onnx["top10_agreement"] >= 0.99
    assert "skipped" in report["tensorrt"] or "max_abs_diff" in report["tensorrt"]
    out = tmp_path / "bench.json"
    p = _run(["export/bench.py", "--engines", str(eng), "--backends", "torch,onnxruntime,tensorrt",
              "--batch-sizes", "1,4", "--out", str(out), "--plot", str(tmp_path / "b.png"),
              "--warmup-s", "0.1", "--budget-s", "0.3"])  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    bench = json.loads(out.read_text())
    keys = {"backend", "device", "batch", "p50_ms", "p90_ms", "p99_ms", "samples_per_s", "n_runs"}
    assert {(r["backend"], r["batch"]) for r in bench["rows"]} >= {("onnxruntime", 1), ("onnxruntime", 4)}
    assert all(set(r) == keys for r in bench["rows"])
    ran = {r["backend"] for r in bench["rows"]}
    assert ran | {s["backend"] for s in bench["skipped"]} == {"torch", "onnxruntime", "tensorrt"}
    assert (tmp_path / "b.png").stat().st_size > 1000
    e2e = {(r["backend"], r["path"], r["batch"]) for r in bench["e2e_rows"]}  # raw request -> venue ids
    assert {("onnxruntime", p, b) for p in ("state", "raw") for b in (1, 4)} <= e2e
    assert bench["e2e_vs_graph_batch1"]["onnxruntime"]["interleaved"] > 0


@pytest.mark.slow  # ~60 s on 2 cores: prepare, ONNX export with parity, evaluate on 300 samples
@pytest.mark.skipif(not NYC.is_dir(), reason=f"{NYC} not present")
def test_retrieval_run_exports_and_evaluates(tmp_path: Path) -> None:
    """The retrieval head (docs/SCALE.md) end to end: the engine does retrieval + scoring in the graph with
    eager parity, and evaluate reports the candidate recall beside the ranks."""
    data, run, eng = tmp_path / "data", tmp_path / "run", tmp_path / "engines"
    p = _run(
        ["-m", "nextlocmoe.cli", "prepare", "--dataset", "fsq-nyc", "--source", str(NYC), "--out", str(data)]
    )
    assert p.returncode == 0, p.stderr[-2000:]
    _fake_run(data, run, ("model.heads.retrieval=true",))
    p = _run(
        ["export/export.py", "--run", str(run), "--out", str(eng), "--format", "onnx", "--n-check", "24"]
    )
    assert p.returncode == 0, p.stderr[-3000:]
    onnx = json.loads((eng / "export_report.json").read_text())["onnx"]
    assert onnx["max_abs_diff"] <= 1e-4 and onnx["top10_agreement"] >= 0.99, onnx
    out = tmp_path / "eval.json"
    p = _run(["-m", "nextlocmoe.cli", "evaluate", "--run", str(run), "--max-samples", "300", "--quiet",
              "--out", str(out)])  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    scored = json.loads(out.read_text())["rankings"]["scored"]
    assert 0.5 < scored["candidate_recall"] <= 1.0 and scored["n"] == 300
    assert scored["hit@20"] <= scored["candidate_recall"]  # a target outside the set is a miss


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    p = _run(["export/bench.py", "--engines", str(tmp_path), "--out", str(tmp_path / "b.json")])
    assert p.returncode != 0 and "not an engine folder" in p.stderr
    p = _run(
        ["export/export.py", "--run", str(tmp_path), "--out", str(tmp_path / "e"), "--format", "onnx,foo"]
    )
    assert p.returncode != 0 and "unknown --format" in p.stderr
