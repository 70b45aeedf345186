"""One writer per run folder, and no silent overwrite (issue 21).

- ``check_run_name``: ``train.name`` is one safe path component (no ``/``, ``..``, empty or hidden name), so
  a run never writes outside ``train.out_dir`` or straight into it.
- ``RunLock``: rank 0 holds an exclusive ``fcntl.flock`` on ``<out_dir>/.<name>.lock`` for the whole job.
  The kernel releases it when the process ends, however it ends (no stale lock after a crash or SIGKILL);
  the file records the holder's pid, host and start time for the refusal message of a second writer. The
  lock file sits beside the run folder, so ``--overwrite`` can move the folder while holding it. (On a
  network filesystem flock is as good as its locking: local disks and NFSv4 honour it.)
- ``claim_run_dir``: a fresh start (no ``--resume``) into a folder that already holds a run is refused unless
  ``--overwrite``, which moves the old run aside to ``<name>.old-<time>`` (never mixed with the new one).
- ``check_resume_config``: ``--resume`` with overrides that change the model or how its state is laid out
  (``model.*``, ep_size, MoE mode, ZeRO stage, precision) is refused with one line, before any file is
  written; config.yaml is rewritten only after the checkpoint has loaded.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path

from nextlocmoe.config import Config, config_to_dict
from nextlocmoe.model.io import RunError, load_run_config

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RESUME_FIXED = ("train.ep_size", "train.moe_parallel", "train.zero_stage", "train.precision")


def check_run_name(name: str) -> None:
    if not SAFE_NAME.match(name or "") or ".." in name:
        raise RunError(
            f"train.name={name!r} must be one folder name (letters, digits, '.', '_', '-'; not empty, not "
            "starting with '.', no '/' or '..'): the run folder is <train.out_dir>/<train.name>"
        )


class RunLock:
    """Exclusive lock of a run folder for this process's life (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.path = run_dir.parent / f".{run_dir.name}.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise RunError(
                f"run folder {run_dir} is in use by another training ({holder}; lock {self.path}); "
                "wait for it, or pick another train.name"
            ) from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%FT%T")})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, info.encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse a fresh start into a folder holding a run unless ``overwrite`` (then move it aside and return
    where it went). Called by rank 0 with the lock held."""
    if resume or not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    if not overwrite:
        ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) if run_dir.is_dir() else []
        held = f" (checkpoints {', '.join(ckpts[-3:])})" if ckpts else ""
        raise RunError(
            f"{run_dir} already holds a run{held}: continue it with --resume, or start over with --overwrite "
            "(the old run is moved aside, never mixed)"
        )
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(aside)
    return aside


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_resume_config(run_dir: Path, cfg: Config) -> None:
    """``--resume``: the run's saved config and this one must agree on everything that shapes the model or
    lays out its checkpointed state; one-line RunError naming the fields otherwise."""
    if not (run_dir / "config.yaml").is_file():
        return
    old, new = _flat(config_to_dict(load_run_config(run_dir))), _flat(config_to_dict(cfg))
    fixed = [k for k in new if k.startswith("model.") or k in RESUME_FIXED]
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in fixed if old.get(k) != new[k]]
    if changed:
        raise RunError(
            f"--resume of {run_dir} with a different model or state layout ({'; '.join(changed[:4])}"
            f"{'; ...' if len(changed) > 4 else ''}): its checkpoints cannot load into it; start a new run "
            "(another train.name, or train.init_from to start from its weights)"
        )
