"""Torch side of the sample store: TrajectoryDataset, collate and make_loader (schema: docs/DATA.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from nextlocmoe.batch_keys import BATCH_KEYS, POINTER_KEYS  # noqa: F401 - re-exported
from nextlocmoe.data.featurize import sample_features
from nextlocmoe.data.layout import (  # noqa: F401 - re-exported for callers of the store API
    RECORD_COLUMNS,
    compute_stats,
    denormalise_xy,
    eval_subset,
    load_locations,
    load_manifest,
    load_stats,
    normalise_dur,
    normalise_xy,
    write_json,
    write_store,
)
from nextlocmoe.data.parsing import DataError
from nextlocmoe.data.windows import SPLITS

# BATCH_KEYS / POINTER_KEYS live in nextlocmoe/batch_keys.py (shared with the model, below both).


class TrajectoryDataset(Dataset):
    """Samples of one split. Item i = target record samples_{split}[i]; its current window = the C records
    right before it, history = up to H records before those (left-padded, masked). Arrays are opened lazily
    (memory-mapped), so the object is cheap to pickle into DataLoader workers."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        history: int | None = None,
        current: int | None = None,
        pointer: int = 0,
        stats: dict | None = None,
    ):
        """``stats``: normalisation statistics other than the data set's own (zero-shot
        ``--normalise source``); default the folder's stats.json."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir)
        self.stats = load_stats(self.data_dir) if stats is None else stats
        self.split = split
        self.history = int(self.manifest["history"] if history is None else history)
        self.current = int(self.manifest["current"] if current is None else current)
        if self.current > int(self.manifest["current"]) + int(self.manifest.get("min_history", 0)):
            raise DataError(f"current={self.current} exceeds the window the data was prepared for")
        self.samples = np.load(self.data_dir / f"samples_{split}.npy", mmap_mode="r")
        self.pointer = int(pointer)
        self.keys = BATCH_KEYS + (POINTER_KEYS if self.pointer > 0 else ())
        self._cols: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cols"] = None
        state["samples"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.samples = np.load(self.data_dir / f"samples_{self.split}.npy", mmap_mode="r")

    @property
    def cols(self) -> dict[str, np.ndarray]:
        if self._cols is None:
            rec = self.data_dir / "records"
            self._cols = {n: np.load(rec / f"{n}.npy", mmap_mode="r") for n in RECORD_COLUMNS}
        return self._cols

    def __len__(self) -> int:
        return len(self.samples)

    def get_batch(self, indices: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """Vectorised items for sample indices [B]: the batch dict (BATCH_KEYS) as numpy arrays, built by
        the one featurizer (``featurize.sample_features``, shared with serving)."""
        i = np.asarray(indices, dtype=np.int64).reshape(-1)
        r = np.asarray(self.samples[i], dtype=np.int64)
        out = sample_features(self.cols, self.stats, r, self.history, self.current, self.pointer)
        out["user"] = self.cols["user"][r].astype(np.int64)
        out["sample_index"] = i
        return {k: out[k] for k in self.keys}

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.get_batch([i]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, np.ndarray]:
        """Batched fetch used by DataLoader (torch >= 2.1): one vectorised gather per batch."""
        return self.get_batch(indices)


def collate(items: list[dict[str, np.ndarray]] | dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Items (list of dataset items, or one `get_batch` dict) -> the batch dict of tensors: keys BATCH_KEYS,
    shapes/dtypes in docs/DATA.md (e.g. hist_xy [B,H,2] float32, hist_mask [B,H] bool)."""
    keys = [k for k in BATCH_KEYS + POINTER_KEYS if k in (items if isinstance(items, dict) else items[0])]
    if isinstance(items, dict):
        return {k: torch.from_numpy(np.ascontiguousarray(items[k])) for k in keys}
    return {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in keys}


def make_loader(
    data_dir: str | Path,
    split: str,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    pointer: int = 0,
) -> DataLoader:
    """DataLoader over TrajectoryDataset with `collate`; a caller's sampler (e.g. DistributedSampler) wins
    over `shuffle` (set_epoch on it is the caller's job)."""
    ds = TrajectoryDataset(data_dir, split, pointer=pointer)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        generator=gen,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
