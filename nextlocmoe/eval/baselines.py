"""Non-learned baselines on the prepared samples.

- ``markov``: first-order transitions from the current place, fitted on all TRAIN-split records; ties by
  ``user_frequency``, then popularity.
- ``user_frequency``: the user's earlier train-split records plus the sample's input window.
- ``global_popularity``: visit counts over the TRAIN split.
- ``online_user_frequency``: all of the user's records before the target, any split.
- ``user_markov``: the user's own transitions from the current place (all records before the target),
  backing off to the city's (train-split) transitions, then to online user frequency, then popularity.
- ``recency_frequency``: sum over the user's records before the target of ``RECENCY_DECAY ** age`` (age in
  records, 0 = the last input record), ties by online frequency, then popularity.
- Exploration baselines (issue 23: for targets the user has never visited), both ranking the places the
  user has not visited before the target (any split) above the visited ones:
  ``explore_nearby``: by a gravity score log(1 + train-split visits) - 2 log(1 + km from the current place);
  ``explore_markov``: by the city's train-split transitions from the current place, then gravity.

All rank every known location with exact ranks (ties by lower location id, see ranking.py) and share
`ranking_metrics`. User counts never include the target or anything after it; the train-split tables
(transitions, popularity) make train-split scores in-sample.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from nextlocmoe.data.layout import RECORD_COLUMNS, eval_subset, load_locations, load_manifest
from nextlocmoe.data.parsing import DataError
from nextlocmoe.eval.metrics import ranking_metrics
from nextlocmoe.eval.ranking import rank_by_keys, top1_by_keys
from nextlocmoe.geo import haversine_m

BASELINES = (
    "markov", "user_frequency", "global_popularity",
    "online_user_frequency", "user_markov", "recency_frequency", "explore_nearby", "explore_markov",
)  # fmt: skip
# Per-record decay of recency_frequency: the best of {0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995} by valid-split
# Hit@1 on fsq-nyc (.2271) and llmmob-fsq-nyc (.2369) (docs/MODEL_QUALITY.md), fixed for every data set.
RECENCY_DECAY = 0.98
CHUNK_ELEMS = 2_000_000


def flat_ranges(starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate [starts_i, starts_i + lens_i) -> (flat indices [T], owner row [T])."""
    lens = np.maximum(lens, 0)
    owner = np.repeat(np.arange(len(starts)), lens)
    offs = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    return np.repeat(starts, lens) + offs, owner


class BaselineModel:
    """Counts fitted on the TRAIN split of a prepared store, scored for target record indices."""

    def __init__(self, rec: dict[str, np.ndarray], n_loc: int, window: int, xy_m: np.ndarray | None = None):
        """``xy_m`` [L, 2] location coordinates in metres (NaN / None: no distances, gravity = popularity)."""
        self.rec, self.n_loc, self.window = rec, n_loc, window
        xy = np.zeros((n_loc, 2)) if xy_m is None else np.nan_to_num(np.asarray(xy_m, dtype=np.float64))
        self.xy_km = xy / 1000.0
        loc, user, train = rec["loc"].astype(np.int64), rec["user"], rec["split"] == 0
        self.train_idx = np.flatnonzero(train)
        self.popularity = np.bincount(loc[train], minlength=n_loc).astype(np.float64)
        step = np.flatnonzero((user[1:] == user[:-1]) & train[1:])  # transition step -> step + 1
        ones = np.ones(len(step))
        self.transitions = sp.csr_matrix((ones, (loc[step], loc[step + 1])), shape=(n_loc, n_loc))

    def user_counts(self, r: np.ndarray) -> np.ndarray:
        """[n, L] counts over each target's earlier train-split records of its user plus its input window."""
        rec, n_loc = self.rec, self.n_loc
        first = r - rec["pos"][r]
        lo = np.searchsorted(self.train_idx, first)
        hi = np.searchsorted(self.train_idx, r)
        idx_t, own_t = flat_ranges(lo, hi - lo)
        w0 = np.maximum(first, r - self.window)
        idx_w, own_w = flat_ranges(w0, r - w0)
        not_train = rec["split"][idx_w] != 0  # train-split window records are already in the prefix
        locs = np.r_[rec["loc"][self.train_idx[idx_t]], rec["loc"][idx_w[not_train]]].astype(np.int64)
        owner = np.r_[own_t, own_w[not_train]]
        return (
            np.bincount(owner * n_loc + locs, minlength=len(r) * n_loc).reshape(len(r), n_loc).astype(float)
        )

    def online_counts(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Over all of each target's user's records before it (any split), [n, L] each: visit counts,
        recency-weighted counts, and counts of transitions from the target's current place (r - 1)."""
        rec, n_loc = self.rec, self.n_loc
        loc = rec["loc"].astype(np.int64)
        first = r - rec["pos"][r]
        idx, own = flat_ranges(first, r - first)
        flat = own * n_loc + loc[idx]
        size = len(r) * n_loc
        counts = np.bincount(flat, minlength=size)
        age = (r[own] - 1 - idx).astype(np.float64)
        recency = np.bincount(flat, weights=RECENCY_DECAY**age, minlength=size)
        follows = (idx > first[own]) & (loc[np.maximum(idx - 1, 0)] == loc[r - 1][own])
        trans = np.bincount(flat[follows], minlength=size)
        return tuple(a.reshape(len(r), n_loc).astype(float) for a in (counts, recency, trans))

    def keys(self, r: np.ndarray) -> dict[str, list[np.ndarray]]:
        """Lexicographic score keys per baseline, each [n, L]."""
        markov = self.transitions[self.rec["loc"][r - 1]].toarray()
        user = self.user_counts(r)
        pop = np.broadcast_to(self.popularity, user.shape)
        online, recency, user_trans = self.online_counts(r)
        unvisited = (online == 0).astype(np.float64)
        d_km = np.linalg.norm(self.xy_km[self.rec["loc"][r - 1]][:, None, :] - self.xy_km[None], axis=-1)
        gravity = np.log1p(pop) - 2.0 * np.log1p(d_km)
        return {
            "markov": [markov, user, pop],
            "user_frequency": [user, pop],
            "global_popularity": [pop],
            "online_user_frequency": [online, pop],
            "user_markov": [user_trans, markov, online, pop],
            "recency_frequency": [recency, online, pop],
            "explore_nearby": [unvisited, gravity],
            "explore_markov": [unvisited, markov, gravity],
        }


def _load_records(data_dir: Path) -> dict[str, np.ndarray]:
    return {n: np.load(data_dir / "records" / f"{n}.npy") for n in RECORD_COLUMNS}


def evaluate_baselines(
    data_dir: str | Path, split: str, progress: bool = True, max_samples: int = 0
) -> tuple[dict, dict]:
    """Ranks and top-1 ids of each baseline on the samples of `split` (`eval_subset` when max_samples > 0).

    Returns:
        ({baseline: {"ranks": [S] int64, "top1": [S] int64}}, {"target": [S] int64 location ids}).
    """
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    path = data_dir / f"samples_{split}.npy"
    if not path.is_file():
        raise DataError(f"{path}: not found (split {split!r})")
    samples = np.load(path)
    samples = samples[eval_subset(len(samples), max_samples)]
    rec = _load_records(data_dir)
    n_loc = int(manifest["locations"])
    xy = load_locations(data_dir)["xy"] if manifest.get("has_coordinates", False) else None
    model = BaselineModel(rec, n_loc, int(manifest["history"]) + int(manifest["current"]), xy)
    target = rec["loc"][samples].astype(np.int64)
    out = {
        b: {"ranks": np.empty(len(samples), np.int64), "top1": np.empty(len(samples), np.int64)}
        for b in BASELINES
    }
    step = max(1, CHUNK_ELEMS // max(n_loc, 1))
    for a in tqdm(
        range(0, len(samples), step), desc=f"baselines {split}", disable=not progress, unit="chunk"
    ):
        r = samples[a : a + step]
        for name, keys in model.keys(r).items():
            out[name]["ranks"][a : a + step] = rank_by_keys(keys, target[a : a + step])
            out[name]["top1"][a : a + step] = top1_by_keys(keys)
    return out, {"target": target}


def distance_errors(
    data_dir: str | Path, pred_loc: np.ndarray, true_loc: np.ndarray
) -> tuple[np.ndarray | None, str]:
    """Distance [S] between predicted and true locations: great-circle metres when the store has WGS84
    coordinates, Euclidean source units when they are normalised, None without coordinates."""
    manifest = load_manifest(data_dir)
    locs = load_locations(data_dir)
    units = manifest.get("coordinate_units", "degrees")
    if not manifest.get("has_coordinates", False) or units == "none":
        return None, "none"
    if units == "normalised":
        return np.linalg.norm(locs["xy"][pred_loc] - locs["xy"][true_loc], axis=1), "normalised"
    d = haversine_m(
        locs["lat"][pred_loc], locs["lon"][pred_loc], locs["lat"][true_loc], locs["lon"][true_loc]
    )
    return d, "metres"


def baseline_report(
    data_dir: str | Path, split: str = "test", progress: bool = True, max_samples: int = 0
) -> dict:
    """{split, n, dataset, ..., baselines: {markov: metrics, user_frequency: ..., global_popularity: ...}}
    on the split's samples (`eval_subset` when `max_samples` > 0, the same ones a model evaluation uses)."""
    t0 = time.perf_counter()
    res, ref = evaluate_baselines(data_dir, split, progress, max_samples)
    report = baseline_metrics(res, ref, data_dir, split)
    report["seconds"] = time.perf_counter() - t0
    return report


def baseline_metrics(res: dict, ref: dict, data_dir: str | Path, split: str) -> dict:
    """The report of ``baseline_report`` from ``evaluate_baselines``' per-sample ranks and top-1 ids."""
    manifest = load_manifest(data_dir)
    report: dict = {
        "split": split,
        "n": int(len(ref["target"])),
        "dataset": manifest.get("dataset"),
        "data": str(data_dir),
        "locations": int(manifest["locations"]),
        "baselines": {},
    }
    units = "none"
    for name in BASELINES:
        dist, units = distance_errors(data_dir, res[name]["top1"], ref["target"])
        m = ranking_metrics(res[name]["ranks"], dist if units == "metres" else None)
        if units == "normalised":
            m["mean_distance_normalised"] = float(dist.mean()) if len(dist) else None
        report["baselines"][name] = m
    report["distance"] = {
        "metres": "great-circle metres between the top-1 and the true location",
        "normalised": "not metres: source normalised units, see mean_distance_normalised",
        "none": "no coordinates in this data set: mean_distance_m is null",
    }[units]
    report["ties"] = "equal scores ranked by lower location id"
    return report
