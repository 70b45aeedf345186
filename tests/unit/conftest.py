"""Model fixtures for the unit tier: the debug config and random batches with the data pipeline's keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nextlocmoe.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def debug_cfg() -> Config:
    return load_config(ROOT / "configs" / "debug.yaml")


def random_batch(B: int = 4, H: int = 12, C: int = 5, L: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = {
        "hist_xy": torch.randn(B, H, 2, generator=g),
        "hist_weekday": torch.randint(0, 7, (B, H), generator=g),
        "hist_hour": torch.randint(0, 24, (B, H), generator=g),
        "hist_dur": torch.rand(B, H, generator=g),
        "hist_mask": torch.ones(B, H, dtype=torch.bool),
        "cur_xy": torch.randn(B, C, 2, generator=g),
        "cur_weekday": torch.randint(0, 7, (B, C), generator=g),
        "cur_hour": torch.randint(0, 24, (B, C), generator=g),
        "cur_dur": torch.rand(B, C, generator=g),
        "hist_loc": torch.randint(0, L, (B, H), generator=g),
        "cur_loc": torch.randint(0, L, (B, C), generator=g),
        "target_xy": torch.randn(B, 2, generator=g),
        "target_dur": torch.rand(B, generator=g),
        "target_loc": torch.randint(0, L, (B,), generator=g),
    }
    b["hist_mask"][0, : H // 2] = False  # a left-padded sample
    b["hist_loc"][0, : H // 2] = -1
    # pointer window (store.POINTER_KEYS) = history + current records, P = H + C
    for k in ("loc", "xy", "weekday", "hour"):
        b[f"ptr_{k}"] = torch.cat([b[f"hist_{k}"], b[f"cur_{k}"]], 1)
    b["ptr_xy"][0, : H // 2] = 0.0
    b["ptr_age_h"] = torch.linspace(200.0, 0.0, H + C).expand(B, H + C).contiguous()
    b["query_weekday"] = torch.randint(0, 7, (B,), generator=g)
    b["query_hour"] = torch.randint(0, 24, (B,), generator=g)
    b["query_gap_h"] = torch.rand(B, generator=g) * 5
    return b
