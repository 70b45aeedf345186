"""Process-group set-up and tear-down for every launcher (deepspeed, torchrun, SLURM), and the final eval.

CPU runs use gloo (FACTS.md: oneCCL is not installable here), GPU runs NCCL. Facts applied here:
OMP_NUM_THREADS=1 per rank unless the user set it (10-25x slower steps otherwise under the deepspeed
launcher), DeepSpeed's shm all-reduce op disabled (it compiles for ~1 min and only serves inference),
``destroy_process_group`` at the end of every worker (rank 0 otherwise sometimes dies with SIGABRT).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from nextlocmoe.config import Config
from train.loop import Dist


def _slurm_env() -> None:
    """Map SLURM's variables to torch.distributed's when launched by srun without torchrun."""
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_process_group(cfg: Config) -> Dist:
    _slurm_env()
    # DeepSpeed 0.19.8's ZeRO calls the deprecated all_gather_into_tensor every step: one warning per rank
    warnings.filterwarnings(
        "ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning
    )
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import deepspeed

    # Internal switch (FACTS.md): skip compiling deepspeed_shm_comm (~58 s), used only for inference
    # all-reduce. If DeepSpeed renames it, this is a no-op and the op is compiled on first use.
    compat = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compat, dict):
        compat["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    import deepspeed.comm as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    d = Dist(dist.get_rank(), dist.get_world_size(), local)
    try:
        check_world(cfg.train.ep_size, d.world)
        if cuda:
            d.device_index = cuda_device_index(local, torch.cuda.device_count())
            torch.cuda.set_device(d.device_index)
    except ValueError as e:
        raise SystemExit(f"train: error: {e}") from None
    return d


def check_world(ep_size: int, world: int) -> None:
    """train.ep_size must divide the world size (expert-data-parallel groups); one-line ValueError."""
    if world % ep_size:
        raise ValueError(f"train.ep_size={ep_size} must divide the world size {world}")


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device of this process. Under srun per-task GPU binding (``--gpus-per-task=1``,
    CUDA_VISIBLE_DEVICES holding one device) every task sees one device, index 0, whatever its LOCAL_RANK;
    with the node's GPUs visible (torchrun, deepspeed launcher) LOCAL_RANK indexes them."""
    if visible < 1:
        raise ValueError("CUDA is available but no device is visible (CUDA_VISIBLE_DEVICES?)")
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise ValueError(f"LOCAL_RANK={local_rank} but only {visible} CUDA devices are visible")
    return local_rank


def shutdown() -> None:
    try:
        import deepspeed.comm as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


def final_eval(run_dir: Path, cfg: Config) -> dict:
    """Rank 0, AFTER the process group is torn down (no other rank waits in a barrier or collective, so no
    NCCL / DeepSpeed timeout applies): reload the final checkpoint into the single-device model (experts
    from DeepSpeed's per-expert files, any ep_size) and write eval.json (CONTRACT.md keys + baselines).
    On CPU: ``nextlocmoe.eval.evaluate.predict_split`` does not move batches to a device yet."""
    from nextlocmoe.eval.evaluate import evaluate_model
    from nextlocmoe.model.io import load_run

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    _, model, _ = load_run(run_dir)
    report = evaluate_model(
        model,
        cfg.data.dir,
        "test",
        cfg.data.eval_batch_size,
        cfg.model.heads.ranking,
        cfg.train.max_eval_samples,
    )
    (run_dir / "eval.json").write_text(json.dumps(report, indent=1))
    keys = ("n", "hit@1", "hit@5", "hit@10", "mrr", "mean_distance_m")
    print("eval (test):", {k: report[k] for k in keys})
    print("markov     :", {k: report["baselines"]["markov"][k] for k in keys})
    return report
