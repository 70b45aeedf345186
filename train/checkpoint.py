"""Checkpoints of a training job: save (every rank, COMPLETE marker, one-line errors on a failed write) and
resume (rank 0 chooses the step, every rank loads it without running pickled code).

Layout and rules: docs/TRAINING.md "Run folder", "Resume"; issue 21 (safe loads, disk full)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nextlocmoe.model.io import RunError, newest_checkpoint

if TYPE_CHECKING:
    from train.loop import Dist


def save_checkpoint(engine, run_dir: Path, step: int, d: Dist) -> Path:
    """All ranks write their shard / experts; rank 0 marks the folder COMPLETE after a barrier. Frozen
    parameters (the backbone) are not saved: loading rebuilds them from the backbone (model.backbone.path,
    or the seeded debug build) and reads the rest over them."""
    import deepspeed.comm as dist

    root = run_dir / "checkpoints"
    tag = f"step{step}"
    try:
        engine.save_checkpoint(
            str(root), tag=tag, client_state={"step": step}, exclude_frozen_parameters=True
        )
        if engine.zero_optimization_partition_weights():
            save_consolidated(engine, root / tag, d)
        dist.barrier()
        if d.is_main:
            (root / f"step{step}" / "COMPLETE").write_text(json.dumps({"step": step, "time": time.time()}))
    except (OSError, RuntimeError) as e:  # disk full, quota, I/O error: one line, the last checkpoint stays
        raise save_error(e, run_dir, root / tag) from e
    dist.barrier()
    return root / f"step{step}"


class CheckpointSaveError(RunError):
    """A checkpoint could not be written; names the folder, the OS error and the resume point left."""


def save_error(e: BaseException, run_dir: Path, folder: Path) -> CheckpointSaveError:
    """One line for a failed save. torch's zip writer reports a full disk as a C++ "file write failed"
    RuntimeError without errno: the free space of the folder's filesystem names it then."""
    import errno
    import shutil

    if isinstance(e, OSError) and e.errno is not None:
        reason = f"[Errno {e.errno}] {os.strerror(e.errno)}" + (f": {e.filename}" if e.filename else "")
    else:
        free = shutil.disk_usage(folder.parent if folder.parent.exists() else run_dir).free
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        reason = first
        if free < 2**20:
            reason = f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)} ({free} bytes free; {first})"
    try:
        last = newest_checkpoint(run_dir).name
    except RunError:
        last = None
    keep = (
        f"the last complete checkpoint, {last}, remains the resume point"
        if last
        else "no complete checkpoint"
    )
    return CheckpointSaveError(f"checkpoint {folder} not saved: {reason}; {keep} (--resume)")


def save_consolidated(engine, ckpt: Path, d: Dist) -> None:
    """ZeRO-3 (replicated mode only): DeepSpeed's model file holds partitioned (empty) parameters, so rank
    0 also writes the trainable parameters and the buffers, gathered, under single-device names as
    ``model_state.pt`` (``nextlocmoe.model.io.CONSOLIDATED``, read first by evaluate / export /
    train.init_from). Collective: every rank calls it."""
    import deepspeed

    from nextlocmoe.model.io import CONSOLIDATED

    module = engine.module
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
        state = {n: p.detach().float().cpu().clone() for n, p in trainable}
    persistent = set(module.state_dict())
    state.update({n: b.detach().cpu().clone() for n, b in module.named_buffers() if n in persistent})
    if d.is_main:
        torch.save(state, ckpt / CONSOLIDATED)


def agree_resume_step(run_dir: Path, d: Dist, device: torch.device | str = "cpu") -> int:
    """The step to resume from, chosen by rank 0 (its newest complete checkpoint, 0 if none) and broadcast,
    so that ranks with node-local or lagging storage cannot load different steps. Every rank then checks
    it sees that folder; if one does not, all ranks raise the same one-line error (no deadlock)."""
    import deepspeed.comm as dist

    step = 0
    if d.is_main:
        try:
            step = int(newest_checkpoint(run_dir).name.removeprefix("step"))
        except RunError:
            step = 0
    if d.world == 1:
        return step
    t = torch.tensor([step], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    step = int(t.item())
    seen = torch.tensor([1 if step == 0 or (run_dir / "checkpoints" / f"step{step}").is_dir() else 0],
                        dtype=torch.int64, device=device)  # fmt: skip
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    if not seen.item():
        raise RunError(f"--resume: rank 0 resumes from step{step} but a rank does not see "
                       f"{run_dir / 'checkpoints' / f'step{step}'} (shared storage needed)")  # fmt: skip
    return step


def resume_step(engine, run_dir: Path, d: Dist) -> int:
    """Load the checkpoint of the agreed step (model, optimizer, scheduler); returns it (0 if none).
    Frozen parameters are not in the checkpoint (``save_checkpoint``): they keep the values the model was
    built with (the backbone), hence ``load_module_strict=False``."""
    step = agree_resume_step(run_dir, d, engine.device)
    if step == 0:
        return 0
    from train.safe_checkpoint import safe_loads

    root = run_dir / "checkpoints"
    with safe_loads(engine):  # weights_only reads: no pickled code runs (train/safe_checkpoint.py)
        _, client = engine.load_checkpoint(str(root), tag=f"step{step}", load_module_strict=False)
    return int(client["step"])
