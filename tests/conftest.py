"""Shared tiny synthetic sources (written into tmp_path; a few hundred rows at most)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLMMOB_NYC_HEADER = "id,user_id,location_id,latitude,longitude,start_day,start_min,weekday"
GEOLIFE_HEADER = "id,user_id,location_id,duration,start_day,end_day,start_min,end_min,weekday"


def make_fsq_nyc(root: Path, n_users: int = 3, per_user: int = 20, n_venues: int = 8, seed: int = 0) -> Path:
    """NYC.npy [user, venue, t] (shuffled rows, distinct times) + NYC_POI.npy [venue, lat, lon]."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        times = np.sort(rng.choice(np.arange(0, 20000, 7), size=per_user, replace=False))
        for t in times:
            rows.append((u, int(rng.integers(1, n_venues + 1)), int(t)))
    arr = np.array(rows, dtype=np.int32)[rng.permutation(len(rows))]
    poi = np.array(
        [(v, 40.7 + 0.01 * v, -74.0 + 0.005 * v) for v in range(1, n_venues + 1)], dtype=np.float64
    )
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "NYC.npy", arr)
    np.save(root / "NYC_POI.npy", poi)
    return root


def make_llmmob(root: Path, kind: str = "nyc", n_users: int = 2, per_split: tuple = (12, 4, 4)) -> Path:
    """LLM-Mob style {foursquare|geolife}_{train,valid,test}.csv, each user's records in time order."""
    root.mkdir(parents=True, exist_ok=True)
    prefix = "foursquare" if kind == "nyc" else "geolife"
    rid = 0
    day = {u: 0 for u in range(1, n_users + 1)}
    for split, n in zip(("train", "valid", "test"), per_split, strict=True):
        lines = [LLMMOB_NYC_HEADER if kind == "nyc" else GEOLIFE_HEADER]
        for u in range(1, n_users + 1):
            for _ in range(n):
                loc = (rid * 7 + u) % 5 + 1
                d, m = day[u], (rid * 37) % 1400
                if kind == "nyc":
                    lines.append(f"{rid},{u},{loc},{-0.5 + 0.2 * loc:.6f},{0.1 * loc:.6f},{d},{m},{d % 7}")
                else:
                    lines.append(f"{rid},{u},{loc},{30.0 + loc},{d},{d},{m},{m + 30},{d % 7}")
                day[u] += 1
                rid += 1
        (root / f"{prefix}_{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def make_checkin_csv(path: Path, n_users: int = 3, per_user: int = 15) -> Path:
    """Generic CSV: user,venue,time (ISO),lat,lon,category."""
    lines = ["user,venue,time,lat,lon,category"]
    for u in range(n_users):
        for i in range(per_user):
            v = (u + i * 3) % 6
            day, hour = 1 + i // 4, (i * 5) % 24
            lines.append(
                f"u{u},{v},2012-04-{day:02d}T{hour:02d}:15:00,{40.7 + 0.01 * v},{-74 + 0.01 * v},cat{v % 2}"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def fsq_dir(tmp_path: Path) -> Path:
    return make_fsq_nyc(tmp_path / "fsq")


@pytest.fixture
def llmmob_nyc_dir(tmp_path: Path) -> Path:
    return make_llmmob(tmp_path / "llm-nyc", "nyc")


@pytest.fixture
def geolife_dir(tmp_path: Path) -> Path:
    return make_llmmob(tmp_path / "geolife", "geolife")


@pytest.fixture
def checkin_csv(tmp_path: Path) -> Path:
    return make_checkin_csv(tmp_path / "checkins.csv")


@pytest.fixture
def prepared_fsq(tmp_path: Path, fsq_dir: Path) -> Path:
    """A prepared store of the tiny fsq-nyc set with H=6, C=3."""
    from nextlocmoe.data.prepare import prepare

    out = tmp_path / "prepared"
    prepare("fsq-nyc", fsq_dir, out, history=6, current=3)
    return out
