"""The DeepSpeed training loop: build -> parallelize -> deepspeed.initialize -> steps -> checkpoints -> eval.

Run by ``train/train.py`` under the deepspeed launcher, torchrun (single or multi-node) or SLURM. Writes the
run folder of CONTRACT.md: config.yaml, metrics.jsonl, checkpoints/step<N>/ (DeepSpeed format, experts in
their per-expert files, COMPLETE marker once every rank has written), eval.json.

Data order is a pure function of (seed, micro-step), so ``--resume`` continues exactly where the
interrupted run was, and the loss curve matches an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nextlocmoe.config import Config, save_config
from nextlocmoe.data.store import TrajectoryDataset, collate
from nextlocmoe.model.build import build_model
from nextlocmoe.model.io import RunError, checkpoint_dir, data_info_from_dir, load_weights
from nextlocmoe.model.loss import compute_loss
from nextlocmoe.model.nextlocmoe import DataInfo, NextLocMoE
from train.checkpoint import agree_resume_step, resume_step, save_checkpoint  # noqa: F401 (re-exported)
from train.throughput import Throughput, model_flops_per_token


class StepFailure(RuntimeError):
    """An exception raised during training step ``step`` (the cause is chained): train/launch.py names the
    step in its one-line reason."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training failed at step {step}")
        self.step = step


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device_index: int | None = None  # CUDA device of this process (train/launch.py), None on CPU

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
    from train.parallel import check_strategy, model_has_moe, moe_param_groups, parallelize, replicate

    ds_cfg = build_ds_config(ds_json, cfg, d.world)  # strategy conflicts fail before the model is built
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    info = data_info_from_dir(cfg.data.dir)
    model = build_model(cfg.model, info)
    if cfg.train.init_from:
        init_weights(model, cfg.train.init_from, info, d)
    if cfg.train.moe_parallel == "expert":  # the layers' dispatchers become DeepSpeed-MoE all-to-all
        model = parallelize(model, cfg.train.ep_size, cfg.train.capacity_factor)
    else:  # replicated: the single-device layers on every rank (plain DP + ZeRO), Switch loss reported
        model = replicate(model)
    check_strategy(cfg.train.zero_stage, model_has_moe(model))
    groups = moe_param_groups(model, cfg.train.lr, cfg.train.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    # DeepSpeed picks its device from LOCAL_RANK unless told (wrong under srun per-task GPU binding)
    args = None if d.device_index is None else argparse.Namespace(device_rank=d.device_index)
    engine, _, _, _ = deepspeed.initialize(
        args=args, model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg
    )
    seed_ranks(cfg.train.seed, d)
    return engine, info


def seed_ranks(seed: int, d: Dist) -> None:
    """After the model is built (same weights everywhere): a per-rank seed for what must differ between
    ranks (dropout masks: LoRA dropout, attention dropout). What must agree needs no RNG: routing selection
    and its tie-breaks are a stable sort (routing.py), data order is a function of (seed, micro-step)
    (``StepBatches``), and QT-Mob recovery masks are seeded by (seed, micro-step) explicitly."""
    torch.manual_seed(seed * 1_000_003 + 7919 * (d.rank + 1))


def _reduce_mean(values: dict[str, float], d: Dist, device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean over ranks of a few scalars. ``device``: the accelerator's current device (engine.device):
    NCCL has no CPU tensors."""
    if d.world == 1:
        return values
    import deepspeed.comm as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / d.world).tolist(), strict=True))


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
            keep = [ln for ln in path.read_text().splitlines() if _row_step(ln, path) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        self.file = path.open("a" if resume_step else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at or past the resumed step (written after the checkpoint) are dropped,
            # so TensorBoard shows one curve, not duplicate steps
            purge = resume_step + 1 if resume_step else None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
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


def _row_step(line: str, path: Path) -> int:
    """The step of one metrics.jsonl line; a damaged line is an error naming the file and line."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: unreadable line {line[:60]!r} ({e}); fix or delete the line") from None


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
    return parts, aux, batch


def load_report(engine, aux, batch: dict[str, torch.Tensor], d: Dist) -> tuple[list, list]:
    """Per MoE layer: expert_load (share per expert, padding excluded, all ranks) and expert_stats
    (train/monitor.py: dead experts, min/max load, capacity, padding ratio, dropped share)."""
    from nextlocmoe.model.personal_moe import PersonalMoE
    from train.monitor import layer_rows, token_mask
    from train.parallel import ExpertParallelDispatcher

    layers = [m for m in engine.module.modules() if isinstance(m, PersonalMoE)]
    stats = [
        m.dispatcher.last_stats if isinstance(m.dispatcher, ExpertParallelDispatcher) else None
        for m in layers
    ]
    if not aux.personal:
        return [], []
    mask_T = token_mask(batch, aux.personal[0].ids_TK.shape[0])
    return layer_rows(aux.personal, stats, mask_T, d.world, engine.device)


def routing_log(aux) -> dict:
    """metrics.jsonl ``routing``: per personalized MoE layer and for the function router, the load of this
    step summed over ranks (empty slots excluded) with balance / dead experts / min-max load vs fair share,
    and the mean per-token router entropy of this rank's tokens (eval/routing_stats.py). Persona layers are
    read on the tokens balancing acts on (``ModelAux.balanced``: the current window by default), the
    tokens ``explain`` reports."""
    from nextlocmoe.eval.routing_stats import torch_layer_stats
    from nextlocmoe.model.routing import expert_counts

    def one(a) -> dict:
        return torch_layer_stats(
            a.probs_TE, a.ids_TK, _sum_over_ranks(expert_counts(a.ids_TK, a.probs_TE.shape[-1]))
        )

    return {
        "personal": [one(a) for a in aux.balanced()],
        "personal_tokens": "current" if aux.focus else "all",
        "semantic": one(aux.semantic) if aux.semantic else None,
    }


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over all ranks (identity on one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def run_step(engine, batches: StepBatches, cfg: Config, xy_std: float, step: int):
    """One optimizer step: ``grad_accum`` micro-steps, then the routers' balancing biases move."""
    step_aux = []
    for a in range(cfg.train.grad_accum):
        ms = (step - 1) * cfg.train.grad_accum + a
        parts, aux, batch = train_step(engine, batches(ms), cfg, xy_std, ms)
        step_aux.append(aux)
    engine.module.balance_step(step_aux, _sum_over_ranks)  # selection biases (model/balance.py)
    return parts, aux, batch


def seq_tokens(model, batch: dict[str, torch.Tensor]) -> int:
    """Decoder tokens per sample: prompt + history window + current window (padding included: computed)."""
    return int(model.prompt_ids.numel() + batch["hist_mask"].shape[1] + batch["cur_xy"].shape[1])


def train_run(cfg: Config, ds_json: str, d: Dist, resume: bool = False, overwrite: bool = False) -> Path:
    """The whole job; returns the run folder. Rank 0 holds the run folder's lock until the process ends
    (train/rundir.py); config.yaml is written once the model is built and any resumed checkpoint loaded."""
    from tqdm import tqdm

    from train.rundir import RunLock, check_resume_config, check_run_name, claim_run_dir

    check_run_name(cfg.train.name)
    run_dir = Path(cfg.train.out_dir) / cfg.train.name
    if d.is_main:
        RunLock(run_dir)  # held (fd open) until the process exits, however it exits
        if resume:
            check_resume_config(run_dir, cfg)
        aside = claim_run_dir(run_dir, resume, overwrite)
        if aside is not None:
            print(f"train: --overwrite: the previous run was moved to {aside}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
    engine, info = build_engine(cfg, ds_json, d)
    start = resume_step(engine, run_dir, d) if resume else 0
    if d.is_main:
        save_config(cfg, run_dir / "config.yaml")
    xy_std = info.xy_std_m
    train_ds = TrajectoryDataset(cfg.data.dir, "train", pointer=cfg.model.pointer_window)
    batches = StepBatches(train_ds, cfg.data.batch_size, d, cfg.train.seed)
    log = MetricsLog(run_dir, d, start)
    acc, total = cfg.train.grad_accum, cfg.train.steps
    bar = tqdm(total=total, initial=start, desc="train", disable=not d.is_main, mininterval=2)
    tput = Throughput(0.0, d.world, cfg.train.peak_tflops)  # windows of log_every steps
    engine.train()
    for step in range(start + 1, total + 1):
        try:
            parts, aux, batch = run_step(engine, batches, cfg, xy_std, step)
            n, S = cfg.data.batch_size * acc * d.world, seq_tokens(engine.module, batch)
            tput.flops_per_token = tput.flops_per_token or model_flops_per_token(engine.module, S)
            tput.step(n, n * S)
        except Exception as e:
            raise StepFailure(step) from e
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == total:
            row = {"step": step, **_reduce_mean(parts.as_floats(), d, engine.device)}
            row["lr"] = engine.get_lr()[0]
            row.update(tput.row())
            row["expert_load"], row["expert_stats"] = load_report(engine, aux, batch, d)
            row["routing"] = routing_log(aux)
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.1f}", dist_m=f"{row['loss_distance']:.0f}")
        if step % cfg.train.ckpt_every == 0 or step == total:
            t_save = time.perf_counter()
            save_checkpoint(engine, run_dir, step, d)
            tput.exclude(time.perf_counter() - t_save)
    bar.close()
    log.close()
    return run_dir
