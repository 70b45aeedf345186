"""Inputs for export, parity checks and benchmarks: held-out samples of a prepared data set, or synthetic
batches with the same keys, shapes and dtypes (docs/DATA.md) when no data set is at hand (tests).

Shape legend: B batch, H history records, C current records, L known locations.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch


def synthetic_batch(
    batch: int, loc_xy_L2: torch.Tensor, history: int = 40, current: int = 5, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random batch shaped like the data pipeline's: records sit on known locations, history is
    left-padded (mask False, loc -1, zeros) by a random amount, current windows are full."""
    g = torch.Generator().manual_seed(seed)
    L = int(loc_xy_L2.shape[0])
    out: dict[str, torch.Tensor] = {}
    for part, n in (("hist", history), ("cur", current)):
        loc = torch.randint(0, L, (batch, n), generator=g)
        out[f"{part}_loc"] = loc
        out[f"{part}_xy"] = loc_xy_L2.float()[loc]
        out[f"{part}_weekday"] = torch.randint(0, 7, (batch, n), generator=g)
        out[f"{part}_hour"] = torch.randint(0, 24, (batch, n), generator=g)
        out[f"{part}_dur"] = torch.rand(batch, n, generator=g)
    pad_B = torch.randint(0, history // 2 + 1, (batch,), generator=g)
    mask = torch.arange(history).unsqueeze(0) >= pad_B.unsqueeze(1)
    out["hist_mask"] = mask
    out["hist_loc"] = torch.where(mask, out["hist_loc"], torch.full_like(out["hist_loc"], -1))
    for k in ("hist_xy", "hist_dur", "hist_weekday", "hist_hour"):
        m = mask.unsqueeze(-1) if out[k].dim() == 3 else mask
        out[k] = torch.where(m, out[k], torch.zeros_like(out[k]))
    out["user"] = torch.randint(0, 100, (batch,), generator=g)
    return out


def held_out_batch(
    data_dir: str | Path, n: int, split: str = "test", seed: int = 0, pointer: int = 0
) -> dict[str, torch.Tensor]:
    """``n`` samples drawn (without replacement, seeded) from a prepared data set's split, collated."""
    from nextlocmoe.data.store import TrajectoryDataset, collate

    ds = TrajectoryDataset(data_dir, split, pointer=pointer)
    if len(ds) == 0:
        raise ValueError(f"{data_dir}: split {split!r} has no samples")
    idx = np.random.default_rng(seed).choice(len(ds), size=min(n, len(ds)), replace=False)
    return collate([ds[int(i)] for i in np.sort(idx)])


def slice_batch(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in batch.items()}


def tile_batch(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Repeat samples cyclically to exactly ``size`` rows (benchmark batches larger than the pool)."""
    n = next(iter(batch.values())).shape[0]
    idx = torch.arange(size) % n
    return {k: v[idx] for k, v in batch.items()}


def save_inputs(path: str | Path, batch: dict[str, torch.Tensor], names: tuple[str, ...]) -> None:
    """The model inputs of ``batch`` as one ``.npz`` (what the benchmark feeds every backend)."""
    np.savez(path, **{k: batch[k].detach().cpu().numpy() for k in names})


def load_inputs(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``save_inputs`` file -> {name: tensor}; ValueError naming the file when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(z[k].copy()) for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read the benchmark inputs ({' '.join(str(e).split())})") from None
