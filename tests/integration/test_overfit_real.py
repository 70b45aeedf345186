"""The debug flavour overfits 64 real fsq-nyc samples: mean distance error falls by >= 5x (issue 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextlocmoe.config import load_config
from nextlocmoe.data.prepare import prepare
from nextlocmoe.data.store import TrajectoryDataset, collate
from nextlocmoe.model.build import build_model
from nextlocmoe.model.io import data_info_from_dir
from nextlocmoe.model.loss import compute_loss, distance_m
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def nyc_dir(tmp_path_factory):
    if not (SHARED_DATA / "fsq-nyc").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    out = tmp_path_factory.mktemp("nyc")
    prepare("fsq-nyc", SHARED_DATA / "fsq-nyc", out)
    return out


def test_debug_flavour_overfits_64_real_samples(nyc_dir) -> None:
    cfg = load_config("configs/debug.yaml", ["model.personal_moe.lora_dropout=0.0"])
    torch.manual_seed(0)
    info = data_info_from_dir(nyc_dir)
    model = build_model(cfg.model, info)
    ds = TrajectoryDataset(nyc_dir, "train", pointer=model.pointer_window)
    batch = collate(ds.get_batch(np.random.default_rng(0).choice(len(ds), 64, replace=False)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def mean_dist() -> float:
        model.eval()
        with torch.no_grad():
            pred, _ = model(batch)
        model.train()
        return float(distance_m(pred.xy, batch["target_xy"], info.xy_std_m).mean())

    before, curve = mean_dist(), []
    for step in range(1, 401):
        pred, aux = model(batch)
        compute_loss(pred, aux, batch, cfg.loss, info.xy_std_m).total.backward()
        opt.step()
        opt.zero_grad()
        if step % 25 == 0:
            curve.append(mean_dist())
            if curve[-1] * 5 <= before:  # reached: stop early (keeps the test short)
                break
    assert curve[-1] * 5 <= before, (before, curve)
