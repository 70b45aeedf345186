"""Data foundation: readers (sources, csvsource), windows/splits, the on-disk layout, and the torch
Dataset/DataLoader (store). Torch-side names are imported lazily so `prepare` does not load torch."""

from __future__ import annotations

from typing import Any

from nextlocmoe.data.layout import denormalise_xy, load_locations, load_manifest, load_stats, normalise_xy
from nextlocmoe.data.parsing import DataError

_TORCH_SIDE = ("BATCH_KEYS", "TrajectoryDataset", "collate", "make_loader")

__all__ = [
    "BATCH_KEYS",
    "DataError",
    "TrajectoryDataset",
    "collate",
    "denormalise_xy",
    "load_locations",
    "load_manifest",
    "load_stats",
    "make_loader",
    "normalise_xy",
]


def __getattr__(name: str) -> Any:
    if name in _TORCH_SIDE:
        from nextlocmoe.data import store

        return getattr(store, name)
    raise AttributeError(f"module 'nextlocmoe.data' has no attribute {name!r}")
