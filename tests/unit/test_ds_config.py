"""build_ds_config: strategy JSON + run config -> DeepSpeed config dict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nextlocmoe.config import load_config
from train.ds_config import DSConfigError, build_ds_config

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = ["zero1", "zero2", "zero2_offload", "gpu_bf16"]
RUN_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "lr")


def _write(tmp_path: Path, ds: dict) -> Path:
    p = tmp_path / "s.json"
    p.write_text(json.dumps(ds))
    return p


def _all_keys(tree: dict) -> set[str]:
    out = set()
    for k, v in tree.items():
        out.add(k)
        if isinstance(v, dict):
            out |= _all_keys(v)
    return out


@pytest.mark.parametrize("name", STRATEGIES)
def test_shipped_strategies_hold_no_run_numbers(name: str) -> None:
    ds = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    keys = _all_keys(ds)
    for key in RUN_KEYS + ("train_batch_size", "optimizer", "scheduler"):
        assert key not in keys, f"{name}.json must not set {key}"
    assert ds["zero_optimization"]["stage"] in (1, 2)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero2_offload"])
def test_fills_run_numbers(name: str) -> None:
    stage = 1 if name == "zero1" else 2
    cfg = load_config(
        None,
        [
            "data.batch_size=7",
            "train.grad_accum=3",
            "train.grad_clip=0.5",
            f"train.zero_stage={stage}",
        ],
    )
    ds = build_ds_config(ROOT / "ds_configs" / f"{name}.json", cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 7
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == stage
    if name == "zero2_offload":
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert ds["zero_force_ds_cpu_optimizer"] is False


def test_gpu_bf16_needs_bf16_precision() -> None:
    path = ROOT / "ds_configs" / "gpu_bf16.json"
    ds = build_ds_config(path, load_config(None, ["train.precision=bf16", "train.zero_stage=2"]))
    assert ds["bf16"]["enabled"] is True
    with pytest.raises(DSConfigError, match="train.precision"):
        build_ds_config(path, load_config(None, ["train.precision=fp32", "train.zero_stage=2"]))


def test_zero_stage_mismatch(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.zero_stage=1"])
    with pytest.raises(DSConfigError, match="zero_optimization.stage.*train.zero_stage"):
        build_ds_config(ROOT / "ds_configs" / "zero2.json", cfg)
    ds = build_ds_config(_write(tmp_path, {}), cfg)  # no stage in the JSON: taken from the run config
    assert ds["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize(
    "ds, field",
    [
        ({"train_micro_batch_size_per_gpu": 4}, "data.batch_size"),
        ({"gradient_accumulation_steps": 2}, "train.grad_accum"),
        ({"gradient_clipping": 5.0}, "train.grad_clip"),
        ({"train_batch_size": 64}, "world size"),
    ],
)
def test_conflicting_run_numbers_raise(tmp_path: Path, ds: dict, field: str) -> None:
    cfg = load_config(None, ["data.batch_size=8", "train.grad_accum=1", "train.grad_clip=1.0"])
    with pytest.raises(DSConfigError, match=field):
        build_ds_config(_write(tmp_path, ds), cfg)


def test_equal_values_and_consistent_train_batch_size_pass(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.batch_size=8", "train.grad_accum=2", "train.grad_clip=1"])
    ds_in = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1, "train_batch_size": 32}
    p = _write(tmp_path, ds_in)
    ds = build_ds_config(p, cfg, world_size=2)
    assert ds["train_batch_size"] == 32


@pytest.mark.parametrize(
    "ds, match",
    [
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "optimizer"),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
        ({"fp16": {"enabled": True}}, "fp16"),
    ],
)
def test_refused_sections(tmp_path: Path, ds: dict, match: str) -> None:
    with pytest.raises(DSConfigError, match=match):
        build_ds_config(_write(tmp_path, ds), load_config(None))


def test_missing_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(DSConfigError, match="not found"):
        build_ds_config(tmp_path / "nope.json", load_config(None))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DSConfigError, match="invalid JSON"):
        build_ds_config(bad, load_config(None))
