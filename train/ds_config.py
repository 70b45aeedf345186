"""DeepSpeed config = a strategy JSON (ds_configs/*.json: ZeRO stage, offload, communication knobs) + the
run-specific numbers from our run config (micro batch, grad accumulation, precision, clipping).

The strategy files hold no run-specific numbers; ``build_ds_config`` fills them in and refuses a strategy
file that disagrees with the run config, so a number is never set in two places with two values.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from nextlocmoe.config import Config


class DSConfigError(ValueError):
    """A DeepSpeed strategy file conflicts with the run config; the message names both sides."""


def _conflict(key: str, json_value: Any, cfg_field: str, cfg_value: Any, path: Path) -> DSConfigError:
    return DSConfigError(
        f"{path}: sets {key}={json_value!r} but the run config has {cfg_field}={cfg_value!r}; "
        f"remove {key} from the strategy file (it is filled in from {cfg_field})"
    )


def _fill(ds: dict[str, Any], key: str, value: Any, cfg_field: str, path: Path) -> None:
    """Set a top-level key from the run config; error if the JSON already has a different value."""
    if key in ds and ds[key] != value:
        raise _conflict(key, ds[key], cfg_field, value, path)
    ds[key] = value


def _fill_precision(ds: dict[str, Any], precision: str, path: Path) -> None:
    if ds.get("fp16", {}).get("enabled", False):
        raise DSConfigError(f"{path}: fp16 is not supported (train.precision is fp32|bf16; use bf16)")
    want = precision == "bf16"
    bf16 = ds.setdefault("bf16", {})
    if "enabled" in bf16 and bool(bf16["enabled"]) != want:
        raise _conflict("bf16.enabled", bf16["enabled"], "train.precision", precision, path)
    bf16["enabled"] = want


def _fill_zero_stage(ds: dict[str, Any], stage: int, path: Path) -> None:
    zero = ds.setdefault("zero_optimization", {})
    if "stage" in zero and int(zero["stage"]) != stage:
        raise _conflict("zero_optimization.stage", zero["stage"], "train.zero_stage", stage, path)
    zero["stage"] = stage


def load_strategy(path: str | Path) -> dict[str, Any]:
    """Read a strategy JSON; a clear error for a missing file, bad JSON or a client-optimizer conflict."""
    p = Path(path)
    if not p.is_file():
        raise DSConfigError(f"DeepSpeed config not found: {p}")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DSConfigError(f"{p}: invalid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise DSConfigError(f"{p}: top level must be a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise DSConfigError(
                f"{p}: must not define '{key}' (training passes a client torch.optim.AdamW and schedule "
                "built from train.lr / train.weight_decay / train.warmup_steps)"
            )
    return ds


def build_ds_config(strategy_json_path: str | Path, cfg: Config, world_size: int | None = None) -> dict:
    """Strategy JSON + run config -> the dict for ``deepspeed.initialize(config=...)``.

    Fills ``train_micro_batch_size_per_gpu`` (data.batch_size), ``gradient_accumulation_steps``
    (train.grad_accum), ``gradient_clipping`` (train.grad_clip), ``bf16.enabled`` (train.precision) and
    ``zero_optimization.stage`` (train.zero_stage). Raises DSConfigError if the JSON already sets one of
    them to another value. ``train_batch_size`` is derived by DeepSpeed; the JSON may set it only if
    ``world_size`` is given and it equals micro batch x grad accum x world size.
    """
    path = Path(strategy_json_path)
    ds = copy.deepcopy(load_strategy(path))
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.data.batch_size, "data.batch_size", path)
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum", path)
    _fill(ds, "gradient_clipping", float(t.grad_clip), "train.grad_clip", path)
    _fill_precision(ds, t.precision, path)
    _fill_zero_stage(ds, t.zero_stage, path)
    if "train_batch_size" in ds:
        want = None if world_size is None else cfg.data.batch_size * t.grad_accum * world_size
        if want is None or ds["train_batch_size"] != want:
            raise _conflict(
                "train_batch_size",
                ds["train_batch_size"],
                "data.batch_size x train.grad_accum x world size",
                want,
                path,
            )
    return ds
