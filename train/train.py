"""Train NextLocMoE with DeepSpeed (ZeRO + DeepSpeed-MoE expert parallelism).

    deepspeed --num_gpus 2 train/train.py --config configs/debug.yaml --deepspeed ds_configs/zero2.json \\
        train.ep_size=2 data.dir=demo-out/data
    torchrun --nproc_per_node 2 train/train.py --config ... --deepspeed ...      (CPU: gloo)
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port P --nproc_per_node G train/train.py ...

Thin entry: parse -> set up the process group -> train (train/loop.py) -> evaluate (sharded over the ranks)
-> close. An exception on any rank ends the job at once (train/launch.py ``fail_fast``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run as a file (``python train/train.py``, torchrun, srun): this folder would shadow the ``train`` package on
# sys.path, so the same code runs as the installed package's module instead (``python -m train.train``).
if __name__ == "__main__" and not __package__:
    _opts = sys.orig_argv[1 : len(sys.orig_argv) - len(sys.argv)]  # interpreter options (-u, -X ...)
    os.execv(sys.executable, [sys.executable, *_opts, "-m", "train.train", *sys.argv[1:]])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (configs/debug.yaml, ...)")
    p.add_argument("--deepspeed", required=True, help="DeepSpeed strategy JSON (ds_configs/*.json)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation (eval.json)")
    p.add_argument(
        "--overwrite", action="store_true", help="start afresh in a run folder holding a run (moved aside)"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return p.parse_intermixed_args(argv)  # flags may follow the key=value overrides


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from nextlocmoe.config import ConfigError, load_config
    from train.ds_config import DSConfigError, load_strategy

    try:
        cfg = load_config(args.config, args.overrides)
        load_strategy(args.deepspeed)  # a broken strategy file fails here, before any process group starts
    except (ConfigError, DSConfigError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    from train.launch import die_with_launcher, fail_fast, final_eval, init_process_group, shutdown

    die_with_launcher()

    # Any exception on any rank: traceback + one line, exit now, never a barrier (train/launch.py).
    try:
        d = init_process_group(cfg)
        from train.loop import train_run

        run_dir = train_run(cfg, args.deepspeed, d, resume=args.resume, overwrite=args.overwrite)
    except BaseException as e:  # noqa: BLE001 - SystemExit / KeyboardInterrupt too
        fail_fast(e, startup=True)
    try:
        if args.no_eval:
            if d.is_main:
                print(f"train: final evaluation skipped; run it with:\n  {eval_command(run_dir, cfg)}")
        else:
            final_eval(run_dir, cfg, d)  # sharded over the ranks, each on its own device
    except BaseException as e:  # noqa: BLE001
        fail_fast(e, startup=False)
    shutdown()
    return 0


def eval_command(run_dir: Path, cfg) -> str:
    """The documented evaluation command for this run (docs/TRAINING.md "Evaluation at scale")."""
    prec = " --precision bf16" if cfg.train.precision == "bf16" else ""
    return (f"torchrun --nproc_per_node <GPUs> --no-python -- nextlocmoe evaluate --run {run_dir}{prec} "
            f"--out {run_dir / 'eval.json'}")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
