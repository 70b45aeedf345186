"""Distributed tier: launch worker scripts under torch.distributed.run (gloo, CPU), 2 ranks at most.

Each launch costs ~5-8 s of start-up, so a worker batches many scenarios and writes its results for the
tests to compare. Environment per FACTS.md: OMP_NUM_THREADS=1 per rank, DS_ACCELERATOR=cpu.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(HERE)]


def launch(script: str, nproc: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``tests/distributed/<script>`` on ``nproc`` local ranks; fail with the output tail on error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(HERE / script),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        pytest.fail(f"{script} on {nproc} ranks exited {proc.returncode}:\n{tail}", pytrace=False)
    return proc


@pytest.fixture(scope="session")
def nyc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped fsq-nyc data prepared once for the tier (read-only for the tests: runs go elsewhere)."""
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "fsq-nyc").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    out = tmp_path_factory.mktemp("data") / "nyc"
    cmd = [sys.executable, "-m", "nextlocmoe.cli", "prepare", "--dataset", "fsq-nyc", "--source",
           str(SHARED_DATA / "fsq-nyc"), "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def ep_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One reference launch (1 rank) and one expert-parallel launch (2 ranks); returns their output dir."""
    out = tmp_path_factory.mktemp("ep")
    launch("ep_worker.py", 1, ["--mode", "ref", "--out", str(out)])
    launch("ep_worker.py", 2, ["--mode", "ep2", "--out", str(out)])
    return out
