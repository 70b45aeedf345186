"""Evaluation on the accelerator, sharded over the ranks of a torchrun / SLURM launch (docs/TRAINING.md).

    torchrun --nproc_per_node G --no-python nextlocmoe evaluate --run RUN [--precision bf16]

Every rank loads the run, takes a contiguous block of the single-process batches (``batch_starts``: the
same batch boundaries and shapes, so the same numbers), predicts on its device, and the per-sample arrays
are gathered to rank 0 in rank order, which computes the metrics and the baselines on the same samples and
writes the report. The merge is exact: the report equals the single-process one (tested on 2 CPU ranks).

This is an evaluation *driver*, not model code: it is the one place in ``nextlocmoe/`` that talks to
``torch.distributed`` (one ``all_gather_object`` of numpy arrays), so it runs under any launcher without
DeepSpeed. Inside ``train/train.py`` it reuses the training job's process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nextlocmoe.eval.evaluate import check_evaluable, predict_split, report_from_predictions
from nextlocmoe.model.precision import PRECISIONS, cast_parameters


@dataclass
class Placement:
    """Where this process evaluates: its rank among ``world`` and its device."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n, "").strip():
            return int(os.environ[n])
    return default


def placement_from_env(device: str = "auto") -> Placement:
    """Rank / world from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or srun (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID). ``device`` auto: CUDA device LOCAL_RANK (device 0 when one GPU is visible, as under srun
    per-task binding), else CPU."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if device == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device = "cpu" if n == 0 else f"cuda:{0 if n == 1 else local}"
    return Placement(rank, world, device)


def ensure_process_group(p: Placement, timeout_s: float = 600.0) -> bool:
    """Start a process group for a multi-rank launch when none exists (returns True if it started one).
    gloo on CPU, NCCL on CUDA with this rank's device bound."""
    if p.world == 1 or dist.is_initialized():
        return False
    kw: dict = {"timeout": timedelta(seconds=timeout_s)}
    if p.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(p.device))
        kw.update(backend="nccl", device_id=torch.device(p.device))
    else:
        kw.update(backend="gloo")
    dist.init_process_group(**kw)
    return True


def gather_predictions(res: dict[str, np.ndarray], p: Placement) -> dict[str, np.ndarray] | None:
    """Per-sample arrays of every rank, concatenated in rank order on rank 0 (None on the others)."""
    if p.world == 1:
        return res
    parts: list = [None] * p.world
    dist.all_gather_object(parts, res)
    if not p.is_main:
        return None
    parts = [r for r in parts if r]  # a rank with no batch (fewer batches than ranks) contributes nothing
    return {k: np.concatenate([r[k] for r in parts]) for k in parts[0]}


def evaluate_run_sharded(
    run_dir: str | Path,
    p: Placement,
    data_dir: str | Path | None = None,
    split: str = "test",
    ranking: str | None = None,
    max_samples: int = 0,
    batch_size: int = 0,
    task: str = "next",
    precision: str = "fp32",
    fallback: bool = False,
) -> dict | None:
    """``evaluate_run`` over ``p.world`` ranks (``p.world`` = 1: one process on ``p.device``). Returns the
    report on rank 0, None on the others. ``precision`` bf16 casts the parameters as DeepSpeed's bf16
    engine does (buffers, routers, heads and the metrics stay fp32: model/precision.py)."""
    from nextlocmoe.model.io import load_run

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    cfg, model, _ = load_run(run_dir, data_dir, fallback=fallback)
    data = data_dir or cfg.data.dir
    check_evaluable(data)
    cast_parameters(model, PRECISIONS[precision])
    bs = batch_size or cfg.data.eval_batch_size
    res = predict_split(model, data, split, bs, max_samples, task, device=p.device, shard=(p.rank, p.world))
    merged = gather_predictions(res, p)
    if merged is None:
        return None
    beam = model.qtmob.beam if getattr(model, "qtmob", None) is not None else 0
    report = report_from_predictions(merged, data, split, ranking or cfg.model.heads.ranking, max_samples,
                                     task=task, beam=beam)  # fmt: skip
    report.update(run=str(run_dir), ranks=p.world, device=p.device, precision=precision)
    return report
