"""Inputs of the bad-input matrix (test_bad_inputs.py): small files written under a tmp folder, and a tiny
run folder with DeepSpeed-layout checkpoints (step1 readable, step2 damaged per case)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from tests.conftest import make_fsq_nyc, make_llmmob

ROOT = Path(__file__).resolve().parents[2]
CSV_HEADER = "user,venue,time,lat,lon,category"
CSV_ARGS = ["--time-col", "time", "--lat-col", "lat", "--lon-col", "lon", "--category-col", "category"]


def csv_rows(n_users: int = 3, per_user: int = 12, tz: str = "") -> list[str]:
    """Data lines of a valid check-in CSV (ISO times with the offset ``tz``, e.g. '+02:00' or 'Z')."""
    out = []
    for u in range(n_users):
        for i in range(per_user):
            v = (u + i * 3) % 6
            out.append(f"u{u},v{v},2012-04-{1 + i // 4:02d}T{(i * 5) % 24:02d}:15:00{tz},"
                       f"{40.7 + 0.01 * v:.4f},{-74 + 0.01 * v:.4f},cat{v % 2}")  # fmt: skip
    return out


def write_csv(path: Path, lines: list[str], header: str = CSV_HEADER, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(newline.join([header, *lines]) + newline)
    return path


def set_field(lines: list[str], col: int, value: str, rows: slice | list[int]) -> list[str]:
    """Copy of ``lines`` with column ``col`` set to ``value`` on the given row indices."""
    out = list(lines)
    for i in range(len(out))[rows] if isinstance(rows, slice) else rows:
        parts = out[i].split(",")
        parts[col] = value
        out[i] = ",".join(parts)
    return out


def hex_llmmob(root: Path) -> Path:
    """The synthetic LLM-Mob NYC folder with every location_id replaced by a 24-hex-digit venue id."""
    src = make_llmmob(root / "src", "nyc", n_users=3, per_split=(14, 4, 4))
    dst = root / "llmmob-fsq-nyc"
    dst.mkdir(parents=True)
    for f in sorted(src.glob("*.csv")):
        lines = f.read_text().splitlines()
        rows = [ln.split(",") for ln in lines[1:]]
        for r in rows:
            r[2] = hashlib.md5(r[2].encode()).hexdigest()[:24]
        (dst / f.name).write_text("\n".join([lines[0]] + [",".join(r) for r in rows]) + "\n")
    return dst


def fsq_with(root: Path, checkins) -> Path:
    """The synthetic fsq-nyc folder with NYC.npy replaced by ``checkins`` (array or raw bytes)."""
    d = make_fsq_nyc(root / "fsq")
    if isinstance(checkins, bytes):
        (d / "NYC.npy").write_bytes(checkins)
    else:
        np.save(d / "NYC.npy", checkins)
    return d


def make_run(root: Path) -> Path:
    """A prepared tiny data set and a run folder as training writes it: config.yaml and complete
    DeepSpeed-layout checkpoints step1 and step2 (``mp_rank_00_model_states.pt`` with ``module``)."""
    from nextlocmoe.config import load_config, save_config
    from nextlocmoe.data.prepare import prepare
    from nextlocmoe.model.build import build_model
    from nextlocmoe.model.io import data_info_from_dir

    data, run = root / "data", root / "run"
    prepare("fsq-nyc", make_fsq_nyc(root / "src", n_users=4, per_user=30), data, history=6, current=3)
    cfg = load_config(ROOT / "configs" / "debug.yaml", [f"data.dir={data}", "data.eval_batch_size=16"])
    state = build_model(cfg.model, data_info_from_dir(data)).state_dict()
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    for step in (1, 2):
        tag = run / "checkpoints" / f"step{step}"
        tag.mkdir(parents=True)
        torch.save({"module": state, "global_steps": step}, tag / "mp_rank_00_model_states.pt")
        (tag / "COMPLETE").write_text("")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n")
    return run


def tiny_engine(root: Path, x_dtype: str = "float32", x_shape: tuple = (4, 3)) -> Path:
    """An engine folder with a one-node ONNX model (y = x + 1, x float32 [B, 3]), frozen.json and
    sample_inputs.npz holding an ``x`` of ``x_dtype`` / ``x_shape``."""
    import onnx
    from onnx import TensorProto, helper

    eng = root / "engine"
    eng.mkdir(parents=True)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "g", [x], [y], [one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # onnx 1.23 defaults to an IR version onnxruntime 1.31 refuses (FACTS.md)
    onnx.save(model, eng / "model.onnx")
    (eng / "frozen.json").write_text(json.dumps({"input_names": ["x"], "output_names": ["y"]}))
    np.savez(eng / "sample_inputs.npz", x=np.zeros(x_shape, dtype=x_dtype))
    return eng
