"""The training entry point end to end on 2 CPU processes (gloo, real DeepSpeed), issue 4 acceptance:
kill-and-resume continues the loss curve exactly, two "nodes" on loopback train the same job, a checkpoint
saved with ep_size=2 reloads on one device (ep_size=1) with the same predictions, start-up errors are early
and one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nextlocmoe.data.store import TrajectoryDataset, collate
from nextlocmoe.model.expert_ckpt import gather_deepspeed_state
from nextlocmoe.model.io import load_run
from tests.conftest import SHARED_DATA

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
STEPS = 12


def job(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    """train/train.py arguments of the job every test here runs (ep_size=2, ZeRO-2, debug flavour)."""
    return [
        "train/train.py",
        "--config",
        "configs/debug.yaml",
        "--deepspeed",
        "ds_configs/zero2.json",
        "--no-eval",
        "train.ep_size=2",
        f"train.steps={STEPS}",
        "train.log_every=1",
        "train.ckpt_every=4",
        "data.batch_size=8",
        f"data.dir={data}",
        f"train.out_dir={out}",
        f"train.name={name}",
        *extra,
    ]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def nyc(tmp_path_factory) -> Path:
    if not (SHARED_DATA / "fsq-nyc").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    out = tmp_path_factory.mktemp("data") / "nyc"
    ok(run([sys.executable, "-m", "nextlocmoe.cli", "prepare", "--dataset", "fsq-nyc",
            "--source", str(SHARED_DATA / "fsq-nyc"), "--out", str(out)]))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def reference(nyc: Path, tmp_path_factory) -> Path:
    """The uninterrupted single-node run: 2 processes, ep_size=2."""
    out = tmp_path_factory.mktemp("runs")
    ok(run(torchrun("--standalone", "--nproc_per_node=2", *job(nyc, out, "ref"))))
    return out / "ref"


def test_kill_and_resume_continues_the_curve(nyc: Path, reference: Path, tmp_path: Path) -> None:
    cmd = torchrun("--standalone", "--nproc_per_node=2", *job(nyc, tmp_path, "b"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    marker = tmp_path / "b" / "checkpoints" / "step4" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # a real kill of the launcher and both ranks
    proc.wait()
    assert marker.is_file()
    assert not (tmp_path / "b" / "checkpoints" / f"step{STEPS}" / "COMPLETE").exists(), "killed too late"
    ok(run(cmd + ["--resume"]))
    ref, got = losses(reference), losses(tmp_path / "b")
    assert sorted(got) == list(range(1, STEPS + 1))  # no step lost or logged twice
    for s in range(1, STEPS + 1):
        assert got[s] == pytest.approx(ref[s], rel=1e-6), (s, got[s], ref[s])
    a = gather_deepspeed_state(reference / "checkpoints" / f"step{STEPS}")
    b = gather_deepspeed_state(tmp_path / "b" / "checkpoints" / f"step{STEPS}")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), k


def test_two_nodes_on_loopback_train_the_same_job(nyc: Path, reference: Path, tmp_path: Path) -> None:
    port = free_port()
    nodes = [
        subprocess.Popen(torchrun("--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1",
                                  "--master_addr=127.0.0.1", f"--master_port={port}",
                                  *job(nyc, tmp_path, "two")),
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]  # fmt: skip
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(o[-2000:] for o in outs)
    ref, got = losses(reference), losses(tmp_path / "two")
    assert got.keys() == ref.keys()
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-6), (s, got[s], ref[s])


def test_ep2_checkpoint_reloads_on_one_device_with_same_predictions(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "ep2_pred.pt"
    ok(run(torchrun("--standalone", "--nproc_per_node=2", "tests/distributed/predict_worker.py",
                    str(reference), "ds_configs/zero2.json", str(out))))  # fmt: skip
    ep2 = torch.load(out, weights_only=False)
    _, model, _ = load_run(reference)  # single device = ep_size 1: experts gathered from per-expert files
    batch = collate(TrajectoryDataset(model_data(reference), "test").get_batch(np.arange(0, 400, 25)))
    with torch.no_grad():
        pred, aux = model(batch)
    assert torch.allclose(pred.xy, ep2["xy"], atol=1e-5)
    assert torch.allclose(pred.scores, ep2["scores"], atol=1e-4)
    for a, ids in zip(aux.personal, ep2["ids"], strict=True):
        assert torch.equal(a.ids_TK, ids.to(a.ids_TK.dtype))  # same experts chosen for every token


def model_data(run_dir: Path) -> str:
    from nextlocmoe.model.io import load_run_config

    return load_run_config(run_dir).data.dir


@pytest.mark.parametrize(
    ("extra", "ds_json", "message"),
    [
        (["train.ep_size=1", "train.zero_stage=3"], {"zero_optimization": {"stage": 3}},
         "not supported with ZeRO Stage 3"),
        (["train.ep_size=1"], {"train_micro_batch_size_per_gpu": 99, "zero_optimization": {"stage": 2}},
         "train_micro_batch_size_per_gpu"),
        (["train.ep_size=3"], None, "divisible by train.ep_size"),
        ([], None, "must divide the world size 1"),
    ],
)  # fmt: skip
def test_startup_errors_are_early_and_one_line(nyc, tmp_path, extra, ds_json, message) -> None:
    args = job(nyc, tmp_path, "bad", *extra)
    if ds_json is not None:
        (tmp_path / "ds.json").write_text(json.dumps(ds_json))
        args[args.index("ds_configs/zero2.json")] = str(tmp_path / "ds.json")
    t = time.time()
    p = run(torchrun("--standalone", "--nproc_per_node=1", *args), timeout=120)
    assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]
    assert "train: error:" in p.stderr  # the entry's one-line reason (not a traceback from deep inside)
    assert not (tmp_path / "bad" / "checkpoints").exists() and time.time() - t < 120
