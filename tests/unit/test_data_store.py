"""Store round trip, TrajectoryDataset items (padding, masks, no leakage), collate, DataLoader, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nextlocmoe.cli import main
from nextlocmoe.data import BATCH_KEYS, TrajectoryDataset, collate, load_locations, load_stats, make_loader
from nextlocmoe.data.prepare import prepare
from nextlocmoe.data.store import RECORD_COLUMNS, denormalise_xy
from nextlocmoe.geo import latlon_to_mercator, mercator_to_latlon

H, C = 6, 3
EXPECTED = {
    "hist_xy": ((H, 2), torch.float32),
    "hist_weekday": ((H,), torch.int64),
    "hist_hour": ((H,), torch.int64),
    "hist_dur": ((H,), torch.float32),
    "hist_mask": ((H,), torch.bool),
    "hist_loc": ((H,), torch.int64),
    "cur_xy": ((C, 2), torch.float32),
    "cur_weekday": ((C,), torch.int64),
    "cur_hour": ((C,), torch.int64),
    "cur_dur": ((C,), torch.float32),
    "cur_loc": ((C,), torch.int64),
    "target_xy": ((2,), torch.float32),
    "target_loc": ((), torch.int64),
    "target_dur": ((), torch.float32),
    "user": ((), torch.int64),
    "sample_index": ((), torch.int64),
}


def test_manifest_and_files(prepared_fsq: Path) -> None:
    m = json.loads((prepared_fsq / "manifest.json").read_text())
    for k in [
        "dataset",
        "source_sha256",
        "users",
        "locations",
        "records",
        "samples",
        "dropped",
        "time_origin",
        "history",
        "current",
    ]:
        assert k in m
    assert m["kept_rows"] + sum(m["dropped"].values()) == m["input_rows"] == 60
    assert (m["history"], m["current"]) == (H, C) and m["has_coordinates"]
    dtypes = {
        "user": np.int32,
        "loc": np.int32,
        "t_min": np.int64,
        "x": np.float64,
        "weekday": np.int8,
        "dur_min": np.float32,
        "split": np.int8,
    }
    for name in RECORD_COLUMNS:
        arr = np.load(prepared_fsq / "records" / f"{name}.npy")
        assert len(arr) == m["records"]
        if name in dtypes:
            assert arr.dtype == dtypes[name]
    for s in ("train", "valid", "test"):
        assert len(np.load(prepared_fsq / f"samples_{s}.npy")) == m["samples"][s]


def test_stats_from_train_only(prepared_fsq: Path) -> None:
    stats = load_stats(prepared_fsq)
    x = np.load(prepared_fsq / "records" / "x.npy")
    split = np.load(prepared_fsq / "records" / "split.npy")
    assert stats["x_mean"] == pytest.approx(x[split == 0].mean())
    locs = load_locations(prepared_fsq)
    assert locs["xy"].shape == (len(locs["id"]), 2)
    lat, lon = mercator_to_latlon(locs["x"], locs["y"])
    assert np.allclose(lat, locs["lat"]) and np.allclose(lon, locs["lon"])


def test_item_windows_and_no_leakage(prepared_fsq: Path) -> None:
    ds = TrajectoryDataset(prepared_fsq, "test")
    rec = {n: np.load(prepared_fsq / "records" / f"{n}.npy") for n in RECORD_COLUMNS}
    stats = load_stats(prepared_fsq)
    for i in range(len(ds)):
        it = ds[i]
        r = int(ds.samples[i])
        assert it["target_loc"] == rec["loc"][r] and it["user"] == rec["user"][r]
        assert it["cur_loc"].tolist() == rec["loc"][r - C : r].tolist()
        n_h = min(H, rec["pos"][r] - C)
        assert it["hist_mask"].sum() == n_h and not it["hist_mask"][: H - n_h].any()
        assert (it["hist_loc"][: H - n_h] == -1).all() and (it["hist_xy"][: H - n_h] == 0).all()
        assert it["hist_loc"][H - n_h :].tolist() == rec["loc"][r - C - n_h : r - C].tolist()
        # every input is an earlier record of the same user (the target never appears in its own input)
        assert rec["pos"][r] >= C + 1 and rec["t_min"][r - C - n_h : r].max() <= rec["t_min"][r]
        xy = denormalise_xy(it["target_xy"].astype(np.float64), stats)
        assert np.allclose(xy, [rec["x"][r], rec["y"][r]], atol=0.05)


def test_collate_keys_shapes_dtypes(prepared_fsq: Path) -> None:
    ds = TrajectoryDataset(prepared_fsq, "train")
    batch = collate([ds[i] for i in range(4)])
    assert tuple(batch) == BATCH_KEYS and set(batch) == set(EXPECTED)
    for k, (shape, dtype) in EXPECTED.items():
        assert batch[k].shape == (4, *shape), k
        assert batch[k].dtype == dtype, k
    assert float(batch["hist_dur"].max()) <= 1.0 and float(batch["cur_dur"].min()) >= 0.0
    assert batch["sample_index"].tolist() == [0, 1, 2, 3]


def test_loader_workers_and_sampler(prepared_fsq: Path) -> None:
    loader = make_loader(prepared_fsq, "train", batch_size=8, shuffle=True, num_workers=2, seed=1)
    seen = torch.cat([b["sample_index"] for b in loader])
    assert sorted(seen.tolist()) == list(range(len(loader.dataset)))
    sampler = torch.utils.data.distributed.DistributedSampler(
        TrajectoryDataset(prepared_fsq, "train"), num_replicas=2, rank=1, shuffle=False
    )
    part = torch.cat([b["sample_index"] for b in make_loader(prepared_fsq, "train", 4, sampler=sampler)])
    assert part.tolist()[:3] == [1, 3, 5]


def test_history_override(prepared_fsq: Path) -> None:
    it = TrajectoryDataset(prepared_fsq, "test", history=2, current=2)[0]
    assert it["hist_loc"].shape == (2,) and it["cur_loc"].shape == (2,)


def test_prepare_other_readers(
    tmp_path: Path, llmmob_nyc_dir: Path, geolife_dir: Path, checkin_csv: Path
) -> None:
    m = prepare("llmmob-geolife", geolife_dir, tmp_path / "g", history=4, current=2)
    assert not m["has_coordinates"] and m["samples"]["test"] == 8
    batch = collate([TrajectoryDataset(tmp_path / "g", "test")[0]])
    assert float(batch["cur_xy"].abs().sum()) == 0.0
    m = prepare("llmmob-fsq-nyc", llmmob_nyc_dir, tmp_path / "n", 4, 2, reference_poi=tmp_path / "none.npy")
    assert m["coordinate_units"] == "normalised" and not m["coordinate_recovery"]["attempted"]
    from nextlocmoe.data.csvsource import CsvSpec

    spec = CsvSpec(time_col="time", lat_col="lat", lon_col="lon", category_col="category")
    m = prepare("csv", checkin_csv, tmp_path / "c", 4, 2, csv_spec=spec)
    assert m["kept_rows"] == 45 and set(load_locations(tmp_path / "c")["category"]) == {"cat0", "cat1"}


def test_recovery_synthetic(tmp_path: Path, llmmob_nyc_dir: Path) -> None:
    """Reference venues = an exact affine image of the normalised coordinates -> recovered to < 1 m."""
    import csv

    pts = set()
    for f in llmmob_nyc_dir.glob("*.csv"):
        for row in csv.DictReader(f.open()):
            pts.add((float(row["latitude"]), float(row["longitude"])))
    ref = np.array([(i, 40.7 + 0.1 * a, -74.0 + 0.2 * b) for i, (a, b) in enumerate(sorted(pts))])
    np.save(tmp_path / "poi.npy", ref)
    m = prepare("llmmob-fsq-nyc", llmmob_nyc_dir, tmp_path / "n", 4, 2, reference_poi=tmp_path / "poi.npy")
    rec = m["coordinate_recovery"]
    assert rec["accepted"] and rec["median_residual_m"] < 1.0 and m["coordinate_units"] == "degrees"
    assert np.allclose(rec["scale"], [0.1, 0.2], atol=1e-6)


def test_geo_roundtrip() -> None:
    x, y = latlon_to_mercator(np.array([40.7]), np.array([-74.0]))
    lat, lon = mercator_to_latlon(x, y)
    assert np.allclose([lat[0], lon[0]], [40.7, -74.0])


def test_cli_prepare_and_errors(tmp_path: Path, fsq_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "fsq-nyc",
                "--source",
                str(fsq_dir),
                "--out",
                str(tmp_path / "o"),
                "--history",
                "4",
                "--current",
                "2",
            ]
        )
        == 0
    )
    assert "60 rows" in capsys.readouterr().out
    out_json = tmp_path / "b.json"
    assert (
        main(
            ["evaluate", "--baselines-only", "--data", str(tmp_path / "o"), "--out", str(out_json), "--quiet"]
        )
        == 0
    )
    rep = json.loads(out_json.read_text())
    assert (
        set(rep["baselines"])
        == {
            "markov",
            "user_frequency",
            "global_popularity",
            "online_user_frequency",
            "user_markov",
            "recency_frequency",
            "explore_nearby",
            "explore_markov",
        }
        and rep["split"] == "test"
    )
    code = main(
        ["prepare", "--dataset", "fsq-nyc", "--source", str(tmp_path / "nope"), "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "source not found" in err and len(err.strip().splitlines()) == 1
    assert main(["evaluate", "--baselines-only", "--data", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
