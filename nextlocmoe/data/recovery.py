"""Recover WGS84 coordinates of LLM-Mob's rescaled ([-1, 1]) Foursquare NYC locations by affine registration
(lat = a_lat * y + b_lat, lon = a_lon * x + b_lon) against the STAN release's venue table (same source)."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from nextlocmoe.geo import haversine_m

M_PER_DEG_LAT = 111_320.0


def _fit_axis(q: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Least squares p ~ a * q + b for [K] arrays."""
    a, b = np.linalg.lstsq(np.c_[q, np.ones_like(q)], p, rcond=None)[0]
    return float(a), float(b)


def register_affine(
    norm: np.ndarray, ref: np.ndarray, iters: int = 40, accept_median_m: float = 30.0
) -> dict:
    """Fit a per-axis affine map from normalised points to reference lat/lon by iterated nearest-neighbour
    matching + least squares (trimmed: the worse-matched half is ignored in each fit).

    Args:
        norm: [K, 2] unique normalised (lat, lon) points. ref: [M, 2] reference (lat, lon) degrees.
    Returns:
        dict with scale [2], offset [2], median/p90 residual metres (haversine to the matched reference
        venue), matched_fraction (residual < accept_median_m), n_points, accepted (median < accept_median_m).
    """
    lo_q, hi_q, lo_p, hi_p = norm.min(0), norm.max(0), ref.min(0), ref.max(0)
    scale = (hi_p - lo_p) / np.where(hi_q > lo_q, hi_q - lo_q, 1.0)
    offset = lo_p - scale * lo_q
    w = np.array([M_PER_DEG_LAT, M_PER_DEG_LAT * np.cos(np.radians(ref[:, 0].mean()))])
    tree = cKDTree(ref * w)
    for it in range(iters):
        d, j = tree.query((norm * scale + offset) * w)
        cut = np.percentile(d, 80) if it < iters // 4 else max(accept_median_m, float(np.median(d)))
        keep = d <= cut
        if keep.sum() < 3:
            break
        for k in range(2):
            scale[k], offset[k] = _fit_axis(norm[keep, k], ref[j[keep], k])
    fitted = norm * scale + offset
    _, j = tree.query(fitted * w)
    res = haversine_m(fitted[:, 0], fitted[:, 1], ref[j, 0], ref[j, 1])
    median = float(np.median(res))
    return {
        "method": "per-axis affine, bbox init, iterated NN matching + trimmed least squares",
        "scale": [float(s) for s in scale],
        "offset": [float(o) for o in offset],
        "median_residual_m": median,
        "p90_residual_m": float(np.percentile(res, 90)),
        "matched_fraction": float(np.mean(res < accept_median_m)),
        "n_points": int(len(norm)),
        "accepted": bool(median < accept_median_m),
    }
