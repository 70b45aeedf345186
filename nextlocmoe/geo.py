"""Geodesy helpers: Web-Mercator projection and great-circle (haversine) distance.

All functions are vectorised over numpy arrays of any (broadcastable) shape.
"""

from __future__ import annotations

import numpy as np

EARTH_RADIUS_M = 6_378_137.0  # WGS84 semi-major axis, the Web-Mercator sphere
MEAN_EARTH_RADIUS_M = 6_371_008.8  # IUGG mean radius, for haversine distances
MAX_MERCATOR_LAT = 85.05112878


def latlon_to_mercator(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """WGS84 degrees -> Web-Mercator (EPSG:3857) metres.

    Args:
        lat, lon: degrees, same shape [...]. NaN propagates.
    Returns:
        (x, y) metres, each shape [...], float64.
    """
    lat = np.clip(np.asarray(lat, dtype=np.float64), -MAX_MERCATOR_LAT, MAX_MERCATOR_LAT)
    lon = np.asarray(lon, dtype=np.float64)
    x = EARTH_RADIUS_M * np.radians(lon)
    y = EARTH_RADIUS_M * np.log(np.tan(np.pi / 4.0 + np.radians(lat) / 2.0))
    return x, y


def mercator_to_latlon(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Web-Mercator metres -> WGS84 degrees (inverse of `latlon_to_mercator`).

    Args:
        x, y: metres, same shape [...].
    Returns:
        (lat, lon) degrees, each shape [...], float64.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    lon = np.degrees(x / EARTH_RADIUS_M)
    lat = np.degrees(2.0 * np.arctan(np.exp(y / EARTH_RADIUS_M)) - np.pi / 2.0)
    return lat, lon


def haversine_m(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Great-circle distance in metres between (lat1, lon1) and (lat2, lon2), degrees, broadcast shapes."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp = p2 - p1
    dl = np.radians(np.asarray(lon2, dtype=np.float64) - np.asarray(lon1, dtype=np.float64))
    a = np.sin(dp / 2.0) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2.0) ** 2
    return 2.0 * MEAN_EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def mercator_distance_m(xy1: np.ndarray, xy2: np.ndarray) -> np.ndarray:
    """Great-circle metres between two Web-Mercator points arrays [..., 2] (true metres, not map metres)."""
    lat1, lon1 = mercator_to_latlon(xy1[..., 0], xy1[..., 1])
    lat2, lon2 = mercator_to_latlon(xy2[..., 0], xy2[..., 1])
    return haversine_m(lat1, lon1, lat2, lon2)
