"""On-disk layout of a prepared data set (schema: docs/DATA.md): writing the store, reading its metadata,
and the normalisation helpers. Torch-free, so `prepare` and the baselines start fast."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from nextlocmoe.data.parsing import DataError
from nextlocmoe.data.windows import SPLITS, Prepared

RECORD_COLUMNS = ("user", "loc", "t_min", "x", "y", "weekday", "hour", "dur_min", "split", "pos")


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def compute_stats(records: dict[str, np.ndarray] | Callable[[], Iterable[dict]]) -> dict[str, float]:
    """Normalisation from TRAIN records only: isotropic xy mean/std (metres), log1p-duration min/max.

    ``records``: the record columns (x, y, dur_min, split), or a callable giving a fresh iterable of chunks
    of them (the streaming prepare reads the written store back, one chunk in memory). Sums are exactly
    rounded (math.fsum), so the figures do not depend on how the records are chunked.
    """
    chunks = records if callable(records) else (lambda: [records])
    acc = {"n": 0, "lo": np.inf, "hi": -np.inf}

    def train(col: str, note: bool = False):
        for c in chunks():
            tr = c["split"] == 0
            x, y = c["x"][tr], c["y"][tr]
            fin = np.isfinite(x) & np.isfinite(y)
            if note:
                acc["n"] += int(fin.sum())
                ld = np.log1p(c["dur_min"][tr].astype(np.float64))
                if len(ld):
                    acc["lo"], acc["hi"] = min(acc["lo"], float(ld.min())), max(acc["hi"], float(ld.max()))
            yield from (x[fin] if col == "x" else y[fin]).tolist()

    sx = math.fsum(train("x", note=True))
    sy = math.fsum(train("y"))
    n = acc["n"]
    if n:
        mean = np.array([sx / n, sy / n])

        def sq():
            for c in chunks():
                tr = c["split"] == 0
                x, y = c["x"][tr], c["y"][tr]
                fin = np.isfinite(x) & np.isfinite(y)
                yield from ((x[fin] - mean[0]) ** 2 + (y[fin] - mean[1]) ** 2).tolist()

        std = float(np.sqrt(math.fsum(sq()) / n / 2.0)) or 1.0
    else:
        mean, std = np.zeros(2), 1.0
    lo, hi = (acc["lo"], acc["hi"]) if np.isfinite(acc["lo"]) else (0.0, 1.0)
    return {
        "x_mean": float(mean[0]),
        "y_mean": float(mean[1]),
        "xy_std": std,
        "dur_log1p_min": lo,
        "dur_log1p_max": hi if hi > lo else lo + 1.0,
        "source": "train split records",
    }


def iter_store_records(data_dir: Path, names: tuple[str, ...], rows: int = 1 << 22) -> Iterator[dict]:
    """Chunks of ``rows`` records (name -> [n] array) read from data_dir/records/*.npy with plain reads
    (no memory map, so memory holds one chunk)."""
    files, dtypes, n = {}, {}, 0
    try:
        for name in names:
            f = open(Path(data_dir) / "records" / f"{name}.npy", "rb")
            files[name] = f
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtypes[name] = read(f)
            n = shape[0]
        for _ in range(0, n, rows):
            yield {name: np.fromfile(f, dtype=dtypes[name], count=rows) for name, f in files.items()}
    finally:
        for f in files.values():
            f.close()


def compact_str(a: np.ndarray) -> np.ndarray:
    """Text ids at the width of their longest (a reader's array may be wider); other arrays unchanged."""
    if a.dtype.kind != "U" or not len(a):
        return a
    return a.astype(f"<U{max(1, int(np.char.str_len(a).max()))}")


def write_store(prep: Prepared, out: Path, manifest: dict) -> dict:
    """Write records/*.npy, samples_*.npy, locations.npz, users.npy, stats.json, manifest.json (last)."""
    out = Path(out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    for name in RECORD_COLUMNS:
        np.save(out / "records" / f"{name}.npy", np.ascontiguousarray(prep.records[name]))
    for split in SPLITS:
        np.save(out / f"samples_{split}.npy", prep.samples[split])
    np.savez(out / "locations.npz", **(prep.locations | {"id": compact_str(prep.locations["id"])}))
    np.save(out / "users.npy", compact_str(prep.user_ids))
    stats = compute_stats(prep.records)
    write_json(out / "stats.json", stats)
    write_json(out / "manifest.json", manifest)
    return stats


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: not found (is {path.parent} a `nextlocmoe prepare` output?)")
    return json.loads(path.read_text())


def load_manifest(data_dir: str | Path) -> dict:
    return _read_json(Path(data_dir) / "manifest.json")


def load_stats(data_dir: str | Path) -> dict[str, float]:
    """stats.json: x_mean, y_mean, xy_std (metres), dur_log1p_min, dur_log1p_max."""
    return _read_json(Path(data_dir) / "stats.json")


def load_locations(data_dir: str | Path) -> dict[str, np.ndarray]:
    """Location table: id [L] original ids, xy [L,2] metres (NaN without coordinates), lat, lon [L],
    category [L] str, count [L] records per location."""
    path = Path(data_dir) / "locations.npz"
    if not path.is_file():
        raise DataError(f"{path}: not found (is {data_dir} a `nextlocmoe prepare` output?)")
    with np.load(path, allow_pickle=False) as z:
        t = {k: z[k] for k in z.files}
    t["xy"] = np.stack([t["x"], t["y"]], axis=1)
    return t


def normalise_xy(xy_m: np.ndarray, stats: dict) -> np.ndarray:
    """[..., 2] metres -> normalised (xy - mean) / xy_std."""
    return (xy_m - np.array([stats["x_mean"], stats["y_mean"]])) / stats["xy_std"]


def denormalise_xy(xy, stats: dict):
    """[..., 2] normalised -> Web-Mercator metres (numpy in -> float64 numpy; torch tensor in -> float64
    tensor on the same device)."""
    if hasattr(xy, "new_tensor"):  # torch.Tensor, without importing torch here
        mean = xy.new_tensor([stats["x_mean"], stats["y_mean"]]).double()
        return xy.double() * stats["xy_std"] + mean
    return np.asarray(xy, dtype=np.float64) * stats["xy_std"] + np.array([stats["x_mean"], stats["y_mean"]])


def normalise_dur(dur_min: np.ndarray, stats: dict) -> np.ndarray:
    """Minutes -> log1p min-max normalised, clipped to [0, 1], float32."""
    lo, hi = stats["dur_log1p_min"], stats["dur_log1p_max"]
    return np.clip((np.log1p(dur_min.astype(np.float64)) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def eval_subset(n: int, max_samples: int = 0) -> np.ndarray:
    """Sample positions evaluated when a split is capped at ``max_samples``: evenly spaced over the whole
    split (every user represented, deterministic), the same for the model and the baselines."""
    if not max_samples or max_samples >= n:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, max_samples).round().astype(np.int64))
