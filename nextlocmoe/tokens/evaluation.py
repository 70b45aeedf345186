"""Evaluation hooks for QT-Mob (used by nextlocmoe/eval/evaluate.py): the `codes` ranking (trie-constrained
beam search over the code head) and the deterministic masking of `--task recovery`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nextlocmoe.data.layout import load_locations
from nextlocmoe.eval.metrics import ranking_metrics
from nextlocmoe.geo import haversine_m
from nextlocmoe.model.trie import beam_ranks
from nextlocmoe.tokens.recovery import eval_positions, mask_batch

TASKS = ("next", "recovery")


def task_batch(batch: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """The batch the model sees for ``task``: unchanged for next, one masked record for recovery."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if task == "next":
        return batch
    pos = eval_positions(batch["sample_index"].numpy(), batch["cur_loc"].shape[1]).astype(np.int64)
    return mask_batch(batch, pos[:, None])


def codes_predictions(model: torch.nn.Module, pred, target_B: torch.Tensor) -> dict[str, np.ndarray]:
    """{codes_rank, codes_top1} from the beam search, or {} when the model has no code head."""
    qt = getattr(model, "qtmob", None)
    if qt is None or qt.head is None or pred.hidden is None:
        return {}
    loc, _ = qt.decode(pred.hidden)
    ranks = beam_ranks(loc.cpu(), target_B.cpu(), int(qt.loc_codes.shape[0]))
    return {"codes_rank": ranks.numpy(), "codes_top1": loc[:, 0].cpu().numpy()}


def codes_metrics(res: dict, data_dir: str | Path, beam: int) -> dict:
    locs, t, top1 = load_locations(data_dir), res["target_loc"], res["codes_top1"]
    dist = haversine_m(locs["lat"][top1], locs["lon"][top1], locs["lat"][t], locs["lon"][t])
    m = ranking_metrics(res["codes_rank"], dist)
    m["beam"] = beam
    m["note"] = f"targets outside the beam ranked L (hit@k exact for k <= {beam}; mrr a lower bound)"
    return m
