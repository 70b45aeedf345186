"""The one featurizer: record columns -> the model's sample tensors (schema: docs/DATA.md "Batches").

Used by the sample store (``TrajectoryDataset.get_batch``: training, evaluation, export samples) and by
serving (``nextlocmoe.serve``: raw records of a request turned into the same columns by
``sequence_columns``), so the tensors a model sees in training and in a service come from the same code.

Columns ``cols`` (one row per record, each user's records contiguous and in time order):
``x, y`` float64 Web-Mercator metres (NaN without coordinates), ``weekday, hour`` int, ``dur_min`` float
minutes, ``loc`` int dense location id (-1: not a known location), ``t_min`` int64 minutes, ``pos`` int
index within the user's sequence. A sample is a target record index r; every input is an earlier record
of r's user. Shape legend: B targets, H history, C current window, P pointer window.
"""

from __future__ import annotations

import numpy as np

from nextlocmoe.data.layout import normalise_dur, normalise_xy
from nextlocmoe.data.windows import user_durations

FEATURE_COLUMNS = ("x", "y", "weekday", "hour", "dur_min", "loc", "t_min", "pos")


def record_features(cols: dict[str, np.ndarray], stats: dict, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Features of record indices idx [...] (>= 0): xy [..., 2] normalised (0 without coordinates),
    weekday, hour [...] int64, dur [...] float32 in [0, 1], loc [...] int64."""
    xy = normalise_xy(np.stack([cols["x"][idx], cols["y"][idx]], axis=-1), stats)
    return {
        "xy": np.nan_to_num(xy, nan=0.0).astype(np.float32),
        "weekday": cols["weekday"][idx].astype(np.int64),
        "hour": cols["hour"][idx].astype(np.int64),
        "dur": normalise_dur(cols["dur_min"][idx], stats),
        "loc": cols["loc"][idx].astype(np.int64),
    }


def sample_features(
    cols: dict[str, np.ndarray], stats: dict, r: np.ndarray, history: int, current: int, pointer: int = 0
) -> dict[str, np.ndarray]:
    """Sample tensors of targets r [B] (record indices with pos[r] >= current): hist_* [B, H(, 2)] left-padded
    and masked, cur_* [B, C(, 2)], target_xy / target_loc / target_dur [B], and with ``pointer`` > 0 the
    pointer window ptr_* [B, P] and query_* [B] (``pointer_features``)."""
    r = np.asarray(r, dtype=np.int64).reshape(-1)
    H, C = history, current
    first = r - cols["pos"][r].astype(np.int64)  # each target's user's first record
    cur = record_features(cols, stats, r[:, None] - C + np.arange(C)[None, :])
    h_idx = r[:, None] - C - H + np.arange(H)[None, :]
    mask = h_idx >= first[:, None]
    hist = record_features(cols, stats, np.where(mask, h_idx, r[:, None]))
    out = {}
    for k, v in hist.items():
        m = mask[..., None] if v.ndim == 3 else mask
        out[f"hist_{k}"] = np.where(m, v, np.array(-1 if k == "loc" else 0, dtype=v.dtype))
    out["hist_mask"] = mask
    out.update({f"cur_{k}": v for k, v in cur.items()})
    tgt = record_features(cols, stats, r)
    out.update(target_xy=tgt["xy"], target_loc=tgt["loc"], target_dur=tgt["dur"])
    if pointer > 0:
        out.update(pointer_features(cols, stats, r, first, pointer))
    return out


def pointer_features(
    cols: dict[str, np.ndarray], stats: dict, r: np.ndarray, first: np.ndarray, pointer: int
) -> dict[str, np.ndarray]:
    """Pointer window of targets r [B]: the P records r-P..r-1 of the same user (left-padded: loc -1,
    other fields 0) and the query time. ``ptr_age_h`` = hours from each record to the last input record
    (r-1); ``query_gap_h`` = hours from r-1 to the target. Only records before the target are read, and
    of the target only its time (t_min, weekday, hour)."""
    P = pointer
    j = r[:, None] - P + np.arange(P)[None, :]
    mask = j >= first[:, None]
    f = record_features(cols, stats, np.where(mask, j, r[:, None] - 1))
    t = cols["t_min"]
    last_t = t[r - 1].astype(np.float64)
    age = (last_t[:, None] - t[np.where(mask, j, r[:, None] - 1)]) / 60.0
    z = {"xy": 0.0, "weekday": 0, "hour": 0, "loc": -1}
    out = {}
    for k, fill in z.items():
        m = mask[..., None] if f[k].ndim == 3 else mask
        out[f"ptr_{k}"] = np.where(m, f[k], np.array(fill, dtype=f[k].dtype))
    out["ptr_age_h"] = np.where(mask, age, 0.0).astype(np.float32)
    out["query_weekday"] = cols["weekday"][r].astype(np.int64)
    out["query_hour"] = cols["hour"][r].astype(np.int64)
    out["query_gap_h"] = ((t[r] - last_t) / 60.0).astype(np.float32)
    return out


def sequence_columns(
    seqs: list[dict[str, np.ndarray]], duration_cap_min: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Serving: one user's records + the query per entry of ``seqs`` -> (cols, r [B]) for
    ``sample_features``. Each ``seqs[b]`` holds ``loc, x, y, t_min, weekday, hour`` [n_b] of the user's
    records in time order, the LAST row being the query (the time to predict for; loc -1, x/y NaN).
    Durations are the store's rule (``windows.user_durations``: time to the next record, capped; the last
    input record's duration is its gap to the query)."""
    lens = np.array([len(s["t_min"]) for s in seqs], dtype=np.int64)
    cat = {k: np.concatenate([np.asarray(s[k]) for s in seqs]) for k in ("loc", "x", "y", "t_min")}
    cat.update({k: np.concatenate([np.asarray(s[k]) for s in seqs]) for k in ("weekday", "hour")})
    user = np.repeat(np.arange(len(seqs)), lens)
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    cat["pos"] = np.arange(len(user)) - np.repeat(starts, lens)
    cat["dur_min"] = user_durations(user, cat["t_min"].astype(np.int64), None, duration_cap_min)[0]
    return cat, starts + lens - 1
