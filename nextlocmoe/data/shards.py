"""Stage 3 of the streaming prepare (docs/DATA.md): the engine's sorted records -> the store, written
shard by shard. A shard is a batch of whole users (>= ``shard_rows`` records); each is finished with the
in-memory rules (windows.per_user, windows.sample_targets) and appended to the store's column files, so
memory holds one shard. The column files stay one .npy per column (records/{name}.npy, what every reader
memory-maps); manifest["shards"] lists each shard's user and record ranges, so a rank or a later stage
reads only its slice.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nextlocmoe.data.layout import RECORD_COLUMNS
from nextlocmoe.data.parsing import local_weekday_hour
from nextlocmoe.data.windows import SPLITS, coordinate_spread, per_user, sample_targets

DTYPES = {
    "user": np.int32,
    "loc": np.int32,
    "t_min": np.int64,
    "x": np.float64,
    "y": np.float64,
    "weekday": np.int8,
    "hour": np.int8,
    "dur_min": np.float32,
    "split": np.int8,
    "pos": np.int32,
}


class NpyAppender:
    """A 1-D .npy file of ``n`` items of ``dtype``, written in appended pieces (header first: the bytes
    are np.save's)."""

    def __init__(self, path: Path, dtype, n: int) -> None:
        self.path, self.dtype, self.n, self.written = path, np.dtype(dtype), int(n), 0
        self.f = open(path, "wb")
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.n,),
        }
        np.lib.format.write_array_header_1_0(self.f, header)

    def append(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        a.tofile(self.f)
        self.written += len(a)

    def close(self) -> None:
        self.f.close()
        if self.written != self.n:
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.n} items")


class RawAppender:
    """Items of unknown count: appended raw, then framed as a .npy file by ``finish``."""

    def __init__(self, path: Path, dtype) -> None:
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self.raw = path.with_suffix(".raw")
        self.f = open(self.raw, "wb")

    def append(self, a: np.ndarray) -> None:
        np.ascontiguousarray(a, dtype=self.dtype).tofile(self.f)
        self.n += len(a)

    def finish(self) -> None:
        self.f.close()
        out = NpyAppender(self.path, self.dtype, self.n)
        with open(self.raw, "rb") as f:
            shutil.copyfileobj(f, out.f, 1 << 24)
        out.written = self.n
        out.close()
        self.raw.unlink()


def write_records(
    batches: Iterable[dict[str, np.ndarray]],
    n_records: int,
    locations: dict[str, np.ndarray],
    out: Path,
    window: tuple[int, int, float],
    timezone: str | None = None,
) -> dict:
    """Finish and append each batch (whole users, sorted; columns ucode, loc, t_min, lat, lon, weekday/hour
    or minutes, dur?, split?) to out/records/*.npy and out/samples_*.npy. ``window`` = (current,
    min_history, duration cap). Returns info (the in-memory build's keys), samples per split, records per
    split and the shard index."""
    current, min_history, cap = window
    (out / "records").mkdir(parents=True, exist_ok=True)
    cols = {n: NpyAppender(out / "records" / f"{n}.npy", DTYPES[n], n_records) for n in RECORD_COLUMNS}
    samples = {s: RawAppender(out / f"samples_{s}.npy", np.int64) for s in SPLITS}
    info: dict = {}
    spread = None
    without = dict.fromkeys(SPLITS, 0)
    per_split = [0, 0, 0]
    shards, offset = [], 0
    for b in batches:
        ucode = b["ucode"].astype(np.int64)
        loc = b["loc"].astype(np.int64)
        if np.isfinite(b["lat"]).any():
            spread = coordinate_spread(loc, b["lat"], b["lon"], locations["lat"], locations["lon"], spread)
        part: dict = {}
        pos, dur, split = per_user(ucode, b["t_min"], b.get("dur"), b.get("split"), cap, part)
        if "minutes" in b:
            weekday, hour = local_weekday_hour(np.floor(b["minutes"]).astype(np.int64), timezone)
        else:
            weekday, hour = b["weekday"], b["hour"]
        rec = {"user": ucode, "loc": loc, "t_min": b["t_min"], "x": locations["x"][loc]}
        rec |= {"y": locations["y"][loc], "weekday": weekday, "hour": hour, "dur_min": dur}
        rec |= {"split": split, "pos": pos}
        for n in RECORD_COLUMNS:
            cols[n].append(rec[n])
        s_idx, s_without = sample_targets(pos, split, current, min_history)
        for s in SPLITS:
            samples[s].append(s_idx[s] + offset)
            without[s] += s_without[s]
        for i in range(3):
            per_split[i] += int((split == i).sum())
        shards.append(
            {"users": [int(ucode[0]), int(ucode[-1]) + 1], "records": [offset, offset + len(ucode)]}
        )
        offset += len(ucode)
        info.setdefault("duration", part["duration"])
        info.setdefault("split_method", part["split_method"])
    for a in cols.values():
        a.close()
    for a in samples.values():
        a.finish()
    if spread is not None:
        info = {"location_coordinate_spread_m": spread} | info
    info["targets_without_full_window"] = without
    return {
        "info": info,
        "samples": {s: a.n for s, a in samples.items()},
        "records_per_split": dict(zip(("train", "valid", "test"), per_split, strict=True)),
        "shards": shards,
    }
