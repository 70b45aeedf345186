"""The self-contained engine folder: what serving needs beside the graph (docs/SERVING.md).

``export/export.py`` writes, beside ``model.onnx`` / ``frozen.pt2`` / ``frozen.json``:
- ``serving.json``: format version, engine version, window sizes (H, C, P), every normalisation constant
  (the training data's stats.json), the duration rule and cap, the time convention (time zone of
  weekday/hour), model and data provenance, and the output semantics;
- ``venues.npz``: the venue table in the engine's index order: original ``id``, ``lat``, ``lon``, Web-Mercator
  ``x``, ``y`` (metres), ``count`` (training records), ``category``.
``load_engine`` validates both and raises ``EngineError`` with one line naming the file and field.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SERVING_FILE = "serving.json"
VENUES_FILE = "venues.npz"
FROZEN_META = "frozen.json"
FORMAT_VERSION = 1
STATS_KEYS = ("x_mean", "y_mean", "xy_std", "dur_log1p_min", "dur_log1p_max")
VENUE_KEYS = ("id", "lat", "lon", "x", "y", "count", "category")
# Time zones of weekday/hour per data set reader (docs/DATA.md "Readers"); csv: the --timezone it was
# prepared with, read back from the manifest's time_origin text.
DATASET_TIMEZONE = {"fsq-nyc": "America/New_York"}


class EngineError(ValueError):
    """An engine folder is missing a file or holds an inconsistent one; the message names it."""


@dataclass
class Engine:
    """A loaded engine folder: ``meta`` (serving.json), ``frozen`` (frozen.json), venue table arrays [L]."""

    path: Path
    meta: dict[str, Any]
    frozen: dict[str, Any]
    venues: dict[str, np.ndarray]

    @property
    def version(self) -> str:
        return self.meta["engine_version"]

    @property
    def stats(self) -> dict[str, float]:
        return self.meta["stats"]

    @property
    def windows(self) -> dict[str, int]:
        return self.meta["windows"]

    @property
    def k(self) -> int:
        return int(self.frozen["k"])


def _timezone(manifest: dict) -> str | None:
    if manifest.get("dataset") in DATASET_TIMEZONE:
        return DATASET_TIMEZONE[manifest["dataset"]]
    origin = str(manifest.get("time_origin", ""))
    if "weekday/hour in " in origin:
        return origin.split("weekday/hour in ", 1)[1].split(" ")[0]
    return None


def serving_meta(data_dir: Path, run_dir: Path, ckpt: str, cfg: Any, frozen_meta: dict, onnx: Path) -> dict:
    """serving.json content for an engine exported from ``run_dir`` (checkpoint ``ckpt``) trained on
    ``data_dir``; ``frozen_meta``: frozen.json; ``onnx``: the graph (its hash makes the engine version)."""
    from nextlocmoe.data.layout import load_manifest, load_stats

    manifest, stats = load_manifest(data_dir), load_stats(data_dir)
    digest = hashlib.sha256(onnx.read_bytes()).hexdigest()[:12]
    return {
        "format_version": FORMAT_VERSION,
        "engine_version": f"{Path(run_dir).name}-{ckpt}-{digest}",
        "windows": {
            "history": int(manifest["history"]),
            "current": int(manifest["current"]),
            "pointer": int(cfg.model.pointer_window),
            "min_history": int(manifest.get("min_history", 1)),
        },  # fmt: skip
        "stats": {k: float(stats[k]) for k in STATS_KEYS},
        "duration": {
            "cap_min": float(manifest.get("duration_cap_min", 1440.0)),
            "rule": manifest.get("duration"),
        },
        "time": {
            "timezone": _timezone(manifest),
            "time_origin": manifest.get("time_origin"),
            "query": "records strictly before the query time are the history; the query time is the time "
            "of the check-in to predict (its weekday/hour and gap are model inputs, as in training)",
        },
        "model": {"run": str(Path(run_dir).resolve()), "checkpoint": ckpt, "onnx_sha256_12": digest},
        "data": {
            "dataset": manifest.get("dataset"),
            "source_sha256": manifest.get("source_sha256"),
            "coordinate_system": manifest.get("coordinate_system"),
            "records": manifest.get("records"),
            "locations": manifest.get("locations"),
            "prepared_from": str(Path(data_dir).resolve()),
        },
        "output": {
            "ranking": frozen_meta["ranking"],
            "k": int(frozen_meta["k"]),
            "ids": "original venue ids of the training data (venues.npz 'id', engine index order)",
            "scores": "natural-log probability of each venue being the next one (scored head)"
            if frozen_meta["ranking"] == "scored"
            else "minus the distance in metres from the predicted point to the venue (point ranking)",
        },  # fmt: skip
    }


def write_engine_files(out: Path, data_dir: Path, run_dir: Path, ckpt: str, cfg: Any, onnx: Path) -> dict:
    """Write serving.json and venues.npz into the engine folder ``out`` (frozen.json already there)."""
    from nextlocmoe.data.layout import load_locations

    frozen = json.loads((out / FROZEN_META).read_text())
    locs = load_locations(data_dir)
    np.savez(out / VENUES_FILE, **{k: locs[k] for k in VENUE_KEYS})
    meta = serving_meta(data_dir, run_dir, ckpt, cfg, frozen, onnx)
    (out / SERVING_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise EngineError(
            f"{path}: not found (is {path.parent} an engine folder written by export/export.py?)"
        )
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise EngineError(f"{path}: expected a JSON object")
    return obj


def _check_meta(path: Path, meta: dict) -> None:
    if meta.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{path}: format_version {meta.get('format_version')!r}, this nextlocmoe reads "
                          f"{FORMAT_VERSION} (re-export the run)")  # fmt: skip
    need = {"windows": ("history", "current", "pointer"), "stats": STATS_KEYS, "duration": ("cap_min",),
            "time": ("timezone",), "output": ("ranking", "k")}  # fmt: skip
    for sect, keys in need.items():
        if not isinstance(meta.get(sect), dict):
            raise EngineError(f"{path}: missing section {sect!r}")
        missing = [k for k in keys if k not in meta[sect]]
        if missing:
            raise EngineError(f"{path}: {sect} lacks {missing}")
    bad = [
        k
        for k in STATS_KEYS
        if not isinstance(meta["stats"][k], (int, float)) or not math.isfinite(meta["stats"][k])
    ]
    if bad or meta["stats"]["xy_std"] <= 0:
        raise EngineError(f"{path}: stats {bad or ['xy_std']} not a finite (positive) number")
    if not str(meta.get("engine_version", "")):
        raise EngineError(f"{path}: missing engine_version")


def load_engine(engine_dir: str | Path) -> Engine:
    """Read and validate an engine folder (serving.json, frozen.json, venues.npz); EngineError names the
    file and field of the first problem."""
    root = Path(engine_dir)
    if not root.is_dir():
        raise EngineError(f"{root}: engine folder not found")
    meta = _read_json(root / SERVING_FILE)
    _check_meta(root / SERVING_FILE, meta)
    frozen = _read_json(root / FROZEN_META)
    vpath = root / VENUES_FILE
    if not vpath.is_file():
        raise EngineError(f"{vpath}: not found (re-export the run: engines before serving.json lack it)")
    try:
        with np.load(vpath, allow_pickle=False) as z:
            venues = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise EngineError(f"{vpath}: unreadable ({' '.join(str(e).split())})") from None
    missing = [k for k in VENUE_KEYS if k not in venues]
    if missing:
        raise EngineError(f"{vpath}: lacks {missing}")
    n = int(frozen.get("num_locations", -1))
    if any(len(venues[k]) != n for k in VENUE_KEYS):
        raise EngineError(f"{vpath}: {len(venues['id'])} venues, frozen.json num_locations says {n}")
    if int(frozen.get("k", 0)) != int(meta["output"]["k"]):
        raise EngineError(
            f"{root / SERVING_FILE}: output.k {meta['output']['k']} != frozen.json k {frozen.get('k')}"
        )
    return Engine(root, meta, frozen, venues)
