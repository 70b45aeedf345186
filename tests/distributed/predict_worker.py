"""Worker (torchrun, any world size): rebuild a run's DeepSpeed engine, load the run's newest checkpoint,
predict a fixed batch of test samples; rank 0 saves the predictions to OUT (.pt).

    predict_worker.py RUN_DIR DS_JSON OUT            engine at the run's own ep_size, engine.load_checkpoint
    predict_worker.py RUN_DIR DS_JSON OUT EP_SIZE    engine at another ep_size (e.g. 1 on one rank) built
                                                     with train.init_from=RUN_DIR (the fine-tuning path:
                                                     weights read single-device, then parallelized)

Used to compare expert-parallel / re-partitioned predictions with the single-device reload (load_run)."""

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

SAMPLES = np.arange(0, 400, 25)  # the fixed test samples the tests compare on


def main() -> None:
    run_dir, ds_json, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    cfg = load_run_config(run_dir)
    ep_size = int(sys.argv[4]) if len(sys.argv) > 4 else cfg.train.ep_size
    remap = ep_size != cfg.train.ep_size
    cfg.train.ep_size = ep_size
    if remap:
        cfg.train.init_from = str(run_dir)
    d = init_process_group(cfg)
    try:
        engine, _ = build_engine(cfg, ds_json, d)
        if not remap:
            ckpt = newest_checkpoint(run_dir)
            # frozen parameters (the backbone) are not saved (train/loop.py save_checkpoint): not strict
            engine.load_checkpoint(
                str(ckpt.parent), tag=ckpt.name, load_optimizer_states=False, load_module_strict=False
            )
        engine.eval()
        ds = TrajectoryDataset(cfg.data.dir, "test", pointer=cfg.model.pointer_window)
        batch = collate(ds.get_batch(SAMPLES))
        with torch.no_grad():
            pred, aux = engine(batch)
        if d.is_main:
            ids = [a.ids_TK for a in aux.personal]
            torch.save({"xy": pred.xy, "scores": pred.scores, "ids": ids, "ep_size": ep_size}, out)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
