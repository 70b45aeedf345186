"""The DeepSpeed training loop: build -> parallelize -> deepspeed.initialize -> steps -> checkpoints -> eval.

Run by ``train/train.py`` under the deepspeed launcher, torchrun (single or multi-node) or SLURM. Writes the
run folder of CONTRACT.md: config.yaml, metrics.jsonl, checkpoints/step<N>/ (DeepSpeed format, experts in
their per-expert files, COMPLETE marker once every rank has written), eval.json.

Data order is a pure function of (seed, micro-step), so ``--resume`` continues exactly where the
interrupted run was, and the loss curve matches an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nextlocmoe.config import Config, save_config
from nextlocmoe.data.store import TrajectoryDataset, collate
from nextlocmoe.model.io import RunError, checkpoint_dir, data_info_from_dir, load_weights, newest_checkpoint
from nextlocmoe.model.loss import compute_loss
from nextlocmoe.model.nextlocmoe import DataInfo, NextLocMoE, build_model


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class StepBatches:
    """Deterministic micro-batches: micro-step s -> this rank's slice of a seeded per-epoch permutation.
    Global batch = micro batch x world; every sample is seen once per epoch (last partial batch dropped)."""

    def __init__(self, ds: TrajectoryDataset, micro: int, d: Dist, seed: int) -> None:
        self.ds, self.micro, self.d, self.seed = ds, micro, d, seed
        self.global_batch = micro * d.world
        self.per_epoch = len(ds) // self.global_batch
        if self.per_epoch == 0:
            raise RunError(f"{len(ds)} training samples < one global batch ({self.global_batch})")

    def __call__(self, micro_step: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(micro_step, self.per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ds))
        g = perm[i * self.global_batch : (i + 1) * self.global_batch]
        mine = np.sort(g[self.d.rank * self.micro : (self.d.rank + 1) * self.micro])
        return collate(self.ds.get_batch(mine))


def lr_lambda(cfg: Config):
    """Linear warm-up then cosine decay to 10% (per optimizer step)."""
    warm, total = cfg.train.warmup_steps, cfg.train.steps

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / max(1, warm)
        prog = (step - warm) / max(1, total - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    return f


def init_weights(model: NextLocMoE, path: str, info: DataInfo, d: Dist) -> None:
    """``train.init_from``: a run's weights (any saved ep_size / world size; another data set's per-location
    embeddings skipped) into the single-device model, before it is split into expert-parallel layers."""
    ckpt = checkpoint_dir(path)
    foreign = load_weights(model, ckpt, info)
    if d.is_main:
        note = " (another data set's location table: per-location embeddings skipped)" if foreign else ""
        print(f"train: initialised from {ckpt}{note}", flush=True)


def build_engine(cfg: Config, ds_json: str, d: Dist):
    """Model (single-device code) -> expert-parallel DeepSpeed-MoE layers -> deepspeed.initialize."""
    import deepspeed

    from train.ds_config import build_ds_config
    from train.parallel import check_strategy, model_has_moe, moe_param_groups, parallelize

    ds_cfg = build_ds_config(ds_json, cfg, d.world)  # strategy conflicts fail before the model is built
    torch.manual_seed(cfg.train.seed)
    info = data_info_from_dir(cfg.data.dir)
    model = build_model(cfg.model, info)
    if cfg.train.init_from:
        init_weights(model, cfg.train.init_from, info, d)
    model = parallelize(model, cfg.train.ep_size)
    check_strategy(cfg.train.zero_stage, model_has_moe(model))
    groups = moe_param_groups(model, cfg.train.lr, cfg.train.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
    return engine, info


def _reduce_mean(values: dict[str, float], d: Dist) -> dict[str, float]:
    if d.world == 1:
        return values
    import deepspeed.comm as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / d.world).tolist(), strict=True))


def save_checkpoint(engine, run_dir: Path, step: int, d: Dist) -> Path:
    """All ranks write their shard / experts; rank 0 marks the folder COMPLETE after a barrier."""
    import deepspeed.comm as dist

    root = run_dir / "checkpoints"
    engine.save_checkpoint(str(root), tag=f"step{step}", client_state={"step": step})
    dist.barrier()
    if d.is_main:
        (root / f"step{step}" / "COMPLETE").write_text(json.dumps({"step": step, "time": time.time()}))
    dist.barrier()
    return root / f"step{step}"


def resume_step(engine, run_dir: Path) -> int:
    """Load the newest complete checkpoint (model, optimizer, scheduler); returns its step (0 if none)."""
    try:
        ckpt = newest_checkpoint(run_dir)
    except RunError:
        return 0
    _, client = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return int(client["step"])


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when installed) on rank 0 only."""

    def __init__(self, run_dir: Path, d: Dist, resume_step: int) -> None:
        self.d = d
        self.file = None
        self.tb = None
        if not d.is_main:
            return
        path = run_dir / "metrics.jsonl"
        if resume_step and path.is_file():  # drop lines past the checkpoint we resume from
            keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        self.file = path.open("a" if resume_step else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def train_step(engine, batch: dict[str, torch.Tensor], cfg: Config, xy_std: float, micro_step: int = 0):
    """One micro-step: forward, loss assembled from the explicit aux, backward, (boundary) optimizer step.
    With loss.recovery_weight > 0 the batch also carries masked copies (QT-Mob recovery, docs/QTMOB.md)."""
    if cfg.loss.recovery_weight > 0:
        from nextlocmoe.tokens.recovery import mix_recovery

        lw = cfg.loss
        seed = [cfg.train.seed, micro_step]
        batch = mix_recovery(batch, cfg.model.tokens.recovery_masks, lw.next_weight, lw.recovery_weight, seed)
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    pred, aux = engine(batch)
    parts = compute_loss(pred, aux, batch, cfg.loss, xy_std)
    engine.backward(parts.total)
    engine.step()
    return parts, aux


def routing_log(aux) -> dict:
    """metrics.jsonl ``routing``: per personalized MoE layer and for the function router, the load of this
    step summed over ranks (empty slots excluded) with balance / dead experts / min-max load vs fair share,
    and the mean per-token router entropy of this rank's tokens (eval/routing_stats.py)."""
    from nextlocmoe.eval.routing_stats import torch_layer_stats
    from nextlocmoe.model.balance import slot_counts

    def one(a) -> dict:
        return torch_layer_stats(
            a.probs_TE, a.ids_TK, _sum_over_ranks(slot_counts(a.ids_TK, a.probs_TE.shape[-1]))
        )

    return {
        "personal": [one(a) for a in aux.personal],
        "semantic": one(aux.semantic) if aux.semantic else None,
    }


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over all ranks (identity on one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def train_run(cfg: Config, ds_json: str, d: Dist, resume: bool = False) -> Path:
    """The whole job; returns the run folder."""
    from tqdm import tqdm

    from train.parallel import expert_load

    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    engine, info = build_engine(cfg, ds_json, d)
    start = resume_step(engine, run_dir) if resume else 0
    xy_std = info.xy_std_m
    train_ds = TrajectoryDataset(cfg.data.dir, "train", pointer=cfg.model.pointer_window)
    batches = StepBatches(train_ds, cfg.data.batch_size, d, cfg.train.seed)
    log = MetricsLog(run_dir, d, start)
    acc, total = cfg.train.grad_accum, cfg.train.steps
    bar = tqdm(total=total, initial=start, desc="train", disable=not d.is_main, mininterval=2)
    t0, seen = time.perf_counter(), 0
    engine.train()
    for step in range(start + 1, total + 1):
        step_aux = []
        for a in range(acc):
            ms = (step - 1) * acc + a
            parts, aux = train_step(engine, batches(ms), cfg, xy_std, ms)
            step_aux.append(aux)
        engine.module.balance_step(step_aux, _sum_over_ranks)  # selection biases (model/balance.py)
        seen += cfg.data.batch_size * acc * d.world
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == total:
            row = {"step": step, **_reduce_mean(parts.as_floats(), d)}
            row["lr"] = engine.get_lr()[0]
            row["samples_per_s"] = seen / (time.perf_counter() - t0)
            row["expert_load"] = expert_load(aux.personal, reduce=True)
            row["routing"] = routing_log(aux)
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.1f}", dist_m=f"{row['loss_distance']:.0f}")
        if step % cfg.train.ckpt_every == 0 or step == total:
            save_checkpoint(engine, run_dir, step, d)
    bar.close()
    log.close()
    return run_dir
