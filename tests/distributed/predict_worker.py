"""Worker (torchrun, any world size): rebuild a run's DeepSpeed engine at the run's ep_size, load its newest
checkpoint with engine.load_checkpoint, predict a fixed batch of test samples; rank 0 saves the
predictions to OUT (.pt). Used to compare expert-parallel predictions with the single-device reload."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from nextlocmoe.data.store import TrajectoryDataset, collate  # noqa: E402
from nextlocmoe.model.io import load_run_config, newest_checkpoint  # noqa: E402
from train.launch import init_process_group, shutdown  # noqa: E402
from train.loop import build_engine  # noqa: E402


def main() -> None:
    run_dir, ds_json, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    cfg = load_run_config(run_dir)
    d = init_process_group(cfg)
    try:
        engine, _ = build_engine(cfg, ds_json, d)
        ckpt = newest_checkpoint(run_dir)
        engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=False)
        engine.eval()
        batch = collate(TrajectoryDataset(cfg.data.dir, "test").get_batch(np.arange(0, 400, 25)))
        with torch.no_grad():
            pred, aux = engine(batch)
        if d.is_main:
            ids = [a.ids_TK for a in aux.personal]
            torch.save({"xy": pred.xy, "scores": pred.scores, "ids": ids}, out)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
