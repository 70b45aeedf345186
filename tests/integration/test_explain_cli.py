"""`nextlocmoe explain` and zero-shot `nextlocmoe evaluate --run RUN --data OTHER` end to end on tiny
synthetic prepared sets and debug-flavour runs saved as training saves them (perturbed, untrained)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nextlocmoe.cli import main
from nextlocmoe.data.prepare import prepare
from nextlocmoe.data.store import load_locations
from tests.conftest import make_checkin_csv, make_fsq_nyc

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _fake_run(data_dir: Path, run_dir: Path) -> None:
    from nextlocmoe.config import load_config, save_config
    from nextlocmoe.model.build import build_model
    from nextlocmoe.model.io import CONSOLIDATED, data_info_from_dir

    cfg = load_config(ROOT / "configs" / "debug.yaml", [f"data.dir={data_dir}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, data_info_from_dir(data_dir))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("_B" in n or "router" in n or "loc_emb" in n):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    ckpt = run_dir / "checkpoints" / "step1"
    ckpt.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    torch.save(model.state_dict(), ckpt / CONSOLIDATED)
    (ckpt / "COMPLETE").write_text("")


@pytest.fixture(scope="module")
def two_cities(tmp_path_factory) -> dict[str, Path]:
    """source: 9 venues near (10 N, 10 E); target: 6 venues in NYC (~8,000 km apart); a run on source."""
    root = tmp_path_factory.mktemp("zs")
    src = make_fsq_nyc(root / "src_raw", n_users=3, per_user=20, n_venues=9, seed=0)
    poi = np.load(src / "NYC_POI.npy")
    poi[:, 1] += 10.0 - 40.7
    poi[:, 2] += 10.0 + 74.0
    np.save(src / "NYC_POI.npy", poi)
    tgt = make_fsq_nyc(root / "tgt_raw", n_users=3, per_user=20, n_venues=6, seed=1)
    out = {"src": root / "src", "tgt": root / "tgt", "run": root / "run"}
    prepare("fsq-nyc", src, out["src"], history=6, current=3)
    prepare("fsq-nyc", tgt, out["tgt"], history=6, current=3)
    _fake_run(out["src"], out["run"])
    return out


def test_zero_shot_candidates_are_target_locations_only(two_cities, tmp_path, monkeypatch) -> None:
    import nextlocmoe.eval.evaluate as ev
    from nextlocmoe.model.io import load_run

    tgt_xy = load_locations(two_cities["tgt"])["xy"]
    seen: list[np.ndarray] = []

    def spy(pred, locs_xy, target, *a, **k):
        seen.append(np.asarray(locs_xy))
        return real(pred, locs_xy, target, *a, **k)

    real = ev.rank_by_point
    monkeypatch.setattr(ev, "rank_by_point", spy)
    for norm in ("target", "source"):
        out = tmp_path / f"zs_{norm}.json"
        rc = main(["evaluate", "--run", str(two_cities["run"]), "--data", str(two_cities["tgt"]), "--quiet",
                   "--normalise", norm, "--out", str(out)])  # fmt: skip
        assert rc == 0
        rep = json.loads(out.read_text())
        z = rep["zero_shot"]
        assert z["cross_domain"] and z["normalise"] == norm and z["headline_ranking"] == "scored"
        assert "embedding term" in z["rankings"]["scored"]
        assert set(rep["baselines"]) == {
            "markov",
            "user_frequency",
            "global_popularity",
            "online_user_frequency",
            "user_markov",
            "recency_frequency",
            "explore_nearby",
            "explore_markov",
        }
        assert rep["baselines"]["markov"]["n"] == rep["n"] > 0
        # the scored top-1 is a target venue (a source-city venue would be ~8,000 km off); the point
        # ranking's distance is the predicted POINT's: in the source city under --normalise source
        assert rep["rankings"]["scored"]["mean_distance_m"] < 50_000
        assert (rep["rankings"]["point"]["mean_distance_m"] < 50_000) == (norm == "target")
        assert np.array_equal(seen[-1], tgt_xy)  # the point ranking's candidate table
    # the scored head: target table, no source embeddings, scores over target locations only
    _, model, info = load_run(two_cities["run"], two_cities["tgt"])
    assert model.location_transfer and model.scored.loc_xy_L2.shape == (len(tgt_xy), 2)
    assert torch.equal(model.scored.loc_xy_L2, info.loc_xy_norm) and not model.scored.loc_emb.weight.any()
    # on its own data set nothing is re-targeted
    _, own, _ = load_run(two_cities["run"])
    assert own.location_transfer is None and own.scored.loc_emb.weight.shape[0] == 9


def test_explain_cli_writes_report_and_plots(tmp_path) -> None:
    csv = make_checkin_csv(tmp_path / "c.csv", n_users=3, per_user=15)
    csv.write_text(csv.read_text().replace(",cat0", ",Food").replace(",cat1", ",Residence"))
    data = tmp_path / "cat"
    prepare("csv", csv, data, history=6, current=3, csv_spec=_spec())
    run = tmp_path / "run"
    _fake_run(data, run)
    out = tmp_path / "report"
    assert (
        main(["explain", "--run", str(run), "--out", str(out), "--split", "train", "--max-samples", "0"]) == 0
    )
    rep = json.loads((out / "summary.json").read_text())
    assert rep["n_samples"] > 0 and len(rep["overall"]["persona"]) == 1
    assert rep["category_agreement"]["n_records"] == rep["n_samples"] * 3
    assert rep["category_agreement"]["mapping"] == {"Food": "Commercial", "Residence": "Residential"}
    for name in ("persona_heatmap", "function_by_hour", "expert_load", "category_confusion"):
        assert (out / rep["plots"][name]).stat().st_size > 5000
    raw_users = {str(u) for u in rep["figures"]["persona_heatmap"]["users"]}
    assert raw_users <= set(rep["users"])


def _spec():
    from nextlocmoe.data.csvsource import CsvSpec

    return CsvSpec(user_col="user", venue_col="venue", time_col="time", lat_col="lat", lon_col="lon",
                   category_col="category")  # fmt: skip
