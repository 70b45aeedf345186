"""Acceptance of issue 13: an LLM-Mob-format folder whose location ids are Foursquare-style hex venue ids,
with no reference venue table beside it (no WGS84 recovery), prepares with every valid row kept, and the
model trains (DeepSpeed, 2 CPU ranks, ep_size=2) and evaluates on it."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nextlocmoe.eval.baselines import BASELINES
from tests.conftest import SHARED_DATA

pytestmark = [pytest.mark.integration, pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
LLM = SHARED_DATA / "llmmob-fsq-nyc"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
COUNT_KEYS = ("input_rows", "kept_rows", "dropped", "users", "locations", "records", "samples")


def hex_copy(src: Path, dst: Path) -> int:
    """The LLM-Mob CSVs with every location_id mapped to a 24-hex-digit id (md5 prefix; checked unique)."""
    dst.mkdir(parents=True)
    seen: dict[str, str] = {}
    for f in sorted(src.glob("foursquare_*.csv")):
        with f.open(newline="") as fin, (dst / f.name).open("w", newline="") as fout:
            rows = csv.reader(fin)
            out = csv.writer(fout)
            header = next(rows)
            j = header.index("location_id")
            out.writerow(header)
            for r in rows:
                r[j] = seen.setdefault(r[j], hashlib.md5(r[j].encode()).hexdigest()[:24])
                out.writerow(r)
    assert len(set(seen.values())) == len(seen)
    return len(seen)


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "nextlocmoe.cli", *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p


@pytest.mark.skipif(not LLM.is_dir(), reason=f"{LLM} not present")
def test_hex_ids_prepare_train_evaluate(tmp_path: Path) -> None:
    n_loc = hex_copy(LLM, tmp_path / "src" / "llmmob-fsq-nyc")  # no src/fsq-nyc/NYC_POI.npy beside it
    data, ref = tmp_path / "hex", tmp_path / "int"
    p = cli("prepare", "--dataset", "llmmob-fsq-nyc", "--source", str(tmp_path / "src" / "llmmob-fsq-nyc"),
            "--out", str(data))  # fmt: skip
    assert "coordinates: normalised source units [-1, 1], not metres (no reference venue table at" in p.stdout
    m = json.loads((data / "manifest.json").read_text())
    assert m["input_rows"] == 95372 and m["kept_rows"] + sum(m["dropped"].values()) == m["input_rows"]
    assert m["locations"] == n_loc and m["coordinate_units"] == "normalised"
    assert "no reference venue table" in m["coordinate_system"]
    # the same rows as the shipped integer ids give (same reference-less coordinates)
    cli("prepare", "--dataset", "llmmob-fsq-nyc", "--source", str(LLM), "--out", str(ref),
        "--reference-poi", str(tmp_path / "absent.npy"))  # fmt: skip
    m_int = json.loads((ref / "manifest.json").read_text())
    assert {k: m[k] for k in COUNT_KEYS} == {k: m_int[k] for k in COUNT_KEYS}

    train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "train/train.py", "--config", "configs/debug.yaml", "--deepspeed", "ds_configs/zero2.json",
             "--no-eval", "train.ep_size=2", "train.steps=5", "train.ckpt_every=5", "train.log_every=1",
             "data.batch_size=8", f"data.dir={data}", f"train.out_dir={tmp_path}",
             "train.name=run"]  # fmt: skip
    p = subprocess.run(train, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and all(v == v and v < float("inf") for v in losses)

    out = tmp_path / "eval.json"
    cli("evaluate", "--run", str(tmp_path / "run"), "--max-samples", "200", "--quiet", "--out", str(out))
    rep = json.loads(out.read_text())
    assert rep["n"] == 200 and rep["dataset"] == "llmmob-fsq-nyc"
    assert 0.0 <= rep["hit@1"] <= rep["hit@10"] <= 1.0 and rep["mean_distance_m"] is None
    assert rep["mean_distance_normalised"] > 0 and set(rep["baselines"]) == set(BASELINES)
