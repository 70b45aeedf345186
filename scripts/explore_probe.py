"""Which count signals rank a user's unvisited places (issue 23, docs/MODEL_QUALITY.md "A stronger
unvisited-place ranker"): hand-made scores on random test samples of a prepared store, Hit@10 among the
places not in the 256-record window, for the novel targets only. Test targets are not train records, so
train-split counts cannot contain them.

  python scripts/explore_probe.py DATA [--n 3000]

base = log time-bin popularity - 2 log km to the current place + 2 log transition count from it; each other
row adds one signal to it (dense [L, L] numpy tables: a probe for data sets of a few thousand places).
"""

from __future__ import annotations

import argparse

import numpy as np
from explore_diag import base_tables  # scripts/ is this script's folder: on sys.path

WINDOW = 256


def _pairs(loc, user, train, L: int, steps: range) -> np.ndarray:
    """Dense [L, L] counts of same-user record pairs (i, i + k), k in ``steps``, record i + k a train one."""
    out = np.zeros(L * L)
    for k in steps:
        i = np.flatnonzero((user[k:] == user[:-k]) & train[k:])
        out += np.bincount(loc[i] * L + loc[i + k], minlength=L * L)
    out = out.reshape(L, L)
    np.fill_diagonal(out, 0)
    return out


def _top(M: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest entries of each row (ties at the k-th value kept)."""
    thr = -np.sort(-M, 1)[:, k - 1 : k]
    return np.where((M >= thr) & (M > 0), M, 0)


def tables(data: str) -> dict:
    b = base_tables(data)
    loc, user, tr, L, C, nrm = b["loc"], b["user"], b["train"], b["L"], b["C"], b["nrm"]
    p64 = _pairs(loc, user, tr, L, range(1, 65))
    return {"loc": loc, "user": user, "tb": b["tb"], "L": L, "xy": b["xy"], "pop_h": b["pop_h"],
            "T1": _pairs(loc, user, tr, L, range(1, 2)), "T10": _pairs(loc, user, tr, L, range(1, 11)),
            "T23": _pairs(loc, user, tr, L, range(2, 4)), "cos": C / nrm, "cos32": _top(C, 32) / nrm,
            "cos64": _top(C, 64) / nrm, "p64": p64, "p64cos": p64 / nrm}  # fmt: skip


def scores(t: dict, r: int, w: np.ndarray) -> dict[str, np.ndarray]:
    loc, L = t["loc"], t["L"]
    km = np.hypot(*(t["xy"] - t["xy"][loc[r - 1]]).T) / 1000
    base = np.log1p(t["pop_h"][:, t["tb"][r]]) - 2 * np.log1p(km) + 2 * np.log1p(t["T1"][loc[r - 1]])
    n = np.bincount(w, minlength=L).astype(float)
    b = (n > 0).astype(float)
    cur = w[-5:]
    return {
        "base": base,
        "+ co-visitation (cosine, all pairs)": base + 3 * np.log1p(t["cos"] @ n),
        "+ co-visitation, window places once": base + 3 * np.log1p(t["cos"] @ b),
        "+ co-visitation, 32 kept per place": base + 3 * np.log1p(t["cos32"] @ n),
        "+ co-visitation, 64 kept per place": base + 3 * np.log1p(t["cos64"] @ n),
        "+ successors within 10 of the current 5": base + 2 * np.log1p(t["T10"][cur].sum(0)),
        "+ successors within 10 of the window": base + 2 * np.log1p(n @ t["T10"] / 10),
        "+ successors 2-3 after the current 5": base + 2 * np.log1p(t["T23"][cur].sum(0)),
        "+ pairs within 64 (counts)": base + np.log1p(np.bincount(w[-64:], minlength=L) @ t["p64"]),
        "+ pairs within 64 (cosine)": base + 3 * np.log1p(np.bincount(w[-64:], minlength=L) @ t["p64cos"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="prepared data folder (nextlocmoe prepare --out)")
    ap.add_argument("--n", type=int, default=3000, help="random test samples (seed 0)")
    a = ap.parse_args()
    t = tables(a.data)
    loc, user = t["loc"], t["user"]
    S = np.load(f"{a.data}/samples_test.npy")
    S = S[np.random.default_rng(0).choice(len(S), min(a.n, len(S)), replace=False)]
    hits: dict[str, list[bool]] = {}
    for r in S:
        lo = max(0, r - WINDOW)
        w = loc[lo:r][user[lo:r] == user[r]]
        if len(w) == 0 or loc[r] in set(w.tolist()):
            continue
        seen = np.bincount(w, minlength=t["L"]) > 0
        for k, s in scores(t, r, w).items():
            s = np.where(seen, -1e9, s)
            hits.setdefault(k, []).append(bool((s > s[loc[r]]).sum() < 10))
    n = len(hits["base"])
    print(f"{a.data}: {n} novel targets of {len(S)} samples (Hit@10 SE about {np.sqrt(0.07 * 0.93 / n):.3f})")
    for k, v in hits.items():
        print(f"{k:42s} Hit@10 {np.mean(v):.4f}")


if __name__ == "__main__":
    main()
