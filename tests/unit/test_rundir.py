"""Run folders (train/rundir.py, issue 21): safe names, one writer, no silent overwrite, resume guards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nextlocmoe.config import load_config, save_config
from nextlocmoe.model.io import RunError
from train.rundir import RunLock, check_resume_config, check_run_name, claim_run_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("bad", ["", "../../escaped", "a/b", "..", ".hidden", "x" * 200, "sp ace"])
def test_run_names_are_one_safe_component(bad: str) -> None:
    with pytest.raises(RunError, match="must be one folder name"):
        check_run_name(bad)
    check_run_name("debug-2.run_1")


def test_one_writer_per_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    first = RunLock(run)
    with pytest.raises(RunError, match=rf"in use by another training .*\"pid\": {os.getpid()}"):
        RunLock(run)
    first.release()
    RunLock(run).release()  # free again


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    run = tmp_path / "r"
    code = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
        f"from train.rundir import RunLock; RunLock(Path({str(run)!r})); print('held', flush=True); "
        "time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(RunError, match=f'"pid": {p.pid}'):
        RunLock(run)
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    time.sleep(0.1)
    RunLock(run).release()  # the kernel released the dead holder's lock


def test_fresh_start_into_a_run_is_refused_unless_overwrite(tmp_path: Path) -> None:
    run = tmp_path / "r"
    (run / "checkpoints" / "step100").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 100}\n')
    with pytest.raises(RunError, match="already holds a run .*step100.*--resume.*--overwrite"):
        claim_run_dir(run, resume=False, overwrite=False)
    assert claim_run_dir(run, resume=True, overwrite=False) is None
    aside = claim_run_dir(run, resume=False, overwrite=True)
    assert not run.exists() and (aside / "metrics.jsonl").is_file() and aside.name.startswith("r.old-")
    assert claim_run_dir(run, resume=False, overwrite=False) is None  # nothing there now


def test_resume_refuses_shape_changes_and_allows_the_rest(tmp_path: Path) -> None:
    save_config(load_config(ROOT / "configs" / "debug.yaml"), tmp_path / "config.yaml")
    check_resume_config(tmp_path, load_config(ROOT / "configs" / "debug.yaml", ["train.steps=900"]))
    new = load_config(ROOT / "configs" / "debug.yaml", ["model.personal_moe.lora_r=8"])
    with pytest.raises(RunError, match=r"model.personal_moe.lora_r: 4 -> 8"):
        check_resume_config(tmp_path, new)
    with pytest.raises(RunError, match=r"train.precision: 'fp32' -> 'bf16'"):
        check_resume_config(tmp_path, load_config(ROOT / "configs" / "debug.yaml", ["train.precision=bf16"]))


def test_resume_takes_overrides_in_any_order() -> None:
    """Before: `--resume` followed by key=value overrides gave "unrecognized arguments"."""
    from train.train import parse

    a = parse(["--config", "c", "--deepspeed", "d", "--resume", "train.steps=5", "--no-eval", "x.y=1"])
    assert a.resume and a.no_eval and a.overrides == ["train.steps=5", "x.y=1"]
