"""Process-group set-up and tear-down for every launcher (deepspeed, torchrun, SLURM), fail-fast, final eval.

CPU runs use gloo (FACTS.md: oneCCL is not installable here), GPU runs NCCL. Facts applied here:
OMP_NUM_THREADS=1 per rank unless the user set it (10-25x slower steps otherwise under the deepspeed
launcher), DeepSpeed's shm all-reduce op disabled (it compiles for ~1 min and only serves inference),
``destroy_process_group`` at the end of every worker (rank 0 otherwise sometimes dies with SIGABRT).

Device binding (FACTS.md "Real-path facts"): ``deepspeed.init_distributed`` would pass
``device_id=cuda:$LOCAL_RANK`` to ``init_process_group``, out of range under srun per-task GPU binding (one
visible device, SLURM_LOCALID > 0). So the process group is started here, with this process's own device,
and DeepSpeed adopts it (it only creates its backend when ``torch.distributed`` is already initialised).

Fail fast: an exception on any rank prints that rank's traceback and one line naming the rank, step and
source line, then the process exits at once (``os._exit``): no barrier, no atexit handler that could wait
for ranks sitting in a collective. The launcher (torchrun, the deepspeed launcher, ``srun
--kill-on-bad-exit``) then ends the other ranks.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import torch

from nextlocmoe.config import Config
from train.loop import Dist, StepFailure

EXPECTED = (ValueError, FileNotFoundError)  # at start-up: config / strategy / data errors, one line, exit 2


def die_with_launcher() -> None:
    """Linux: SIGKILL this rank when its parent (torchrun's agent, the deepspeed launcher, srun's step
    daemon) dies, so that a launcher killed with SIGKILL leaves no rank training on as an orphan (torchrun's
    ranks run in their own sessions: FACTS.md). No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return  # not permitted here: best effort
    if os.getppid() == 1:  # the parent died before the call: nobody would deliver the signal
        os._exit(1)


def _slurm_env() -> None:
    """Map SLURM's variables to torch.distributed's when launched by srun without torchrun."""
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_process_group(cfg: Config) -> Dist:
    """Start the job's process group (this process's device bound first) and hand it to DeepSpeed."""
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
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    check_world(cfg.train.ep_size, world)
    device_index = cuda_device_index(local, torch.cuda.device_count()) if cuda else None
    if device_index is not None:
        torch.cuda.set_device(device_index)
    timeout = timedelta(seconds=cfg.train.dist_timeout_s)
    start_torch_group("nccl" if cuda else "gloo", world, device_index, timeout)
    import deepspeed

    # Internal switch (FACTS.md): skip compiling deepspeed_shm_comm (~58 s), used only for inference
    # all-reduce. If DeepSpeed renames it, this is a no-op and the op is compiled on first use.
    compat = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compat, dict):
        compat["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout)
    import deepspeed.comm as dist

    return Dist(dist.get_rank(), dist.get_world_size(), local, device_index)


def start_torch_group(backend: str, world: int, device_index: int | None, timeout: timedelta) -> None:
    """``torch.distributed.init_process_group`` with this process's CUDA device as ``device_id`` (NCCL
    binds communicators to it), never LOCAL_RANK's; env:// rendezvous (RANK, WORLD_SIZE, MASTER_*)."""
    import torch.distributed as tdist

    if tdist.is_initialized():
        return
    kw: dict = {"backend": backend, "timeout": timeout}
    if device_index is not None and world > 1:
        kw["device_id"] = torch.device("cuda", device_index)
    tdist.init_process_group(**kw)


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
    """Normal end of a worker: every rank is here, so one barrier, then the group is destroyed."""
    try:
        import deepspeed.comm as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


def reason(e: BaseException) -> str:
    """One line: the exception (the step it happened at, if any) and the source line that raised it."""
    root = e.__cause__ if isinstance(e, StepFailure) and e.__cause__ is not None else e
    where = ""
    tb = traceback.extract_tb(root.__traceback__)
    if tb:
        where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno} in {tb[-1].name})"
    step = f"step {e.step}: " if isinstance(e, StepFailure) else ""
    msg = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return f"{step}{type(root).__name__}: {msg}{where}"


def fail_fast(e: BaseException, startup: bool = False) -> None:
    """Print this rank's traceback and one reason line, then exit now: no barrier, no process-group
    teardown, no atexit handlers (they may wait on ranks blocked in a collective). A ValueError /
    FileNotFoundError before the first step (``startup``: config, strategy, data, world size) is the
    user's input: one line, exit 2; anything else (a step, the final evaluation) prints the traceback."""
    rank = os.environ.get("RANK", "0")
    expected = startup and isinstance(e, EXPECTED) and not isinstance(e, StepFailure)
    sys.stdout.flush()
    sys.stderr.write("\n")  # rank 0's progress bar (tqdm, no newline) may hold the line: start a fresh one
    if expected:
        print(f"train: error: {e}", file=sys.stderr)
    else:
        traceback.print_exception(e, file=sys.stderr)
        print(f"train: error: rank {rank} failed: {reason(e)}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2 if expected else 1)


def final_eval(run_dir: Path, cfg: Config, d: Dist) -> dict | None:
    """The evaluation of ``nextlocmoe evaluate`` (nextlocmoe/eval/sharded.py) inside the job: every rank
    reloads the final checkpoint into the single-device model on its own device, evaluates its block of
    the test batches in the run's precision, and rank 0 merges them exactly and writes eval.json
    (CONTRACT.md keys + baselines). Collective: every rank calls it."""
    import json

    from nextlocmoe.eval.sharded import Placement, evaluate_run_sharded

    device = "cpu" if d.device_index is None else f"cuda:{d.device_index}"
    if d.device_index is None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    place = Placement(d.rank, d.world, device)
    t = cfg.train
    report = evaluate_run_sharded(run_dir, place, None, "test", None, t.max_eval_samples,
                                  cfg.data.eval_batch_size, precision=t.precision)  # fmt: skip
    if report is None:
        return None
    (run_dir / "eval.json").write_text(json.dumps(report, indent=1))
    keys = ("n", "hit@1", "hit@5", "hit@10", "mrr", "mean_distance_m")
    print("eval (test):", {k: report[k] for k in keys})
    print("markov     :", {k: report["baselines"]["markov"][k] for k in keys})
    return report
