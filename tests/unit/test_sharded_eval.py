"""nextlocmoe/eval/sharded.py without a process group: the batch split and the rank-order merge."""

from __future__ import annotations

import numpy as np
import pytest

from nextlocmoe.eval.evaluate import batch_starts
from nextlocmoe.eval.sharded import Placement, gather_predictions, placement_from_env


@pytest.mark.parametrize(("n", "bs", "world"), [(1000, 256, 2), (200, 256, 2), (10, 3, 4), (7, 7, 3)])
def test_ranks_take_contiguous_blocks_of_the_single_process_batches(n: int, bs: int, world: int) -> None:
    one = batch_starts(n, bs)
    parts = [batch_starts(n, bs, r, world) for r in range(world)]
    assert sum(parts, []) == one  # concatenated in rank order: the same batches, in the same order
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_gather_on_one_process_is_the_identity() -> None:
    res = {"pred_xy": np.zeros((3, 2)), "target_loc": np.arange(3)}
    assert gather_predictions(res, Placement()) is res


def test_placement_from_torchrun_and_srun(monkeypatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    assert placement_from_env("cpu") == Placement(0, 1, "cpu")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert placement_from_env("cpu") == Placement(3, 4, "cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert placement_from_env("cpu") == Placement(1, 2, "cpu")  # torchrun's variables win
