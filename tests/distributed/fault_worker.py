"""train/train.py with a fault injected on one rank (tests/distributed/test_fail_fast.py), or a seed probe.

fault_worker.py raise RANK MICROSTEP -- <train.py arguments>    RuntimeError on RANK at MICROSTEP
fault_worker.py seeds OUT -- <train.py arguments>               per-rank RNG draws + weight digest
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import train.loop as loop  # noqa: E402
import train.train as entry  # noqa: E402


def inject(rank: int, micro: int) -> None:
    real = loop.train_step

    def step(engine, batch, cfg, xy_std, micro_step=0):
        if int(os.environ["RANK"]) == rank and micro_step == micro:
            raise RuntimeError(f"injected fault on rank {rank}")
        return real(engine, batch, cfg, xy_std, micro_step)

    loop.train_step = step


def probe_seeds(out: Path) -> None:
    real = loop.build_engine

    def build(cfg, ds_json, d):
        engine, info = real(cfg, ds_json, d)
        digest = sum(float(p.double().sum()) for p in engine.module.parameters())
        draws = torch.rand(4).tolist()
        (out / f"rank{d.rank}.json").write_text(json.dumps({"digest": digest, "draws": draws}))
        return engine, info

    loop.build_engine = build


if __name__ == "__main__":
    cut = sys.argv.index("--")
    mode, args, train_args = sys.argv[1], sys.argv[2:cut], sys.argv[cut + 1 :]
    if mode == "raise":
        inject(int(args[0]), int(args[1]))
    else:
        probe_seeds(Path(args[0]))
    sys.exit(entry.main(train_args))
