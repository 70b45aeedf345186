"""Model <-> files: data info from a prepared folder, single-device state dicts, loading a training run
(DeepSpeed checkpoint with per-expert files, any ep_size) into the single-device model.

Only ``torch.load`` of DeepSpeed's files is needed here (no deepspeed import): the key mapping from the
expert-parallel layer back to the single-device ``PersonalMoE`` lives in ``expert_ckpt.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from nextlocmoe.config import Config, config_from_dict
from nextlocmoe.data.store import load_locations, load_manifest, load_stats, normalise_xy
from nextlocmoe.model.nextlocmoe import DataInfo, NextLocMoE, build_model

CONSOLIDATED = "model_state.pt"  # single-device state dict written beside DeepSpeed checkpoints


class RunError(ValueError):
    """A run folder is incomplete or inconsistent; the message names the file."""


def data_info_from_dir(data_dir: str | Path) -> DataInfo:
    """Location table (normalised coords) and normalisation stats of a prepared data set."""
    manifest = load_manifest(data_dir)
    if not manifest.get("has_coordinates", False):
        raise RunError(
            f"{data_dir}: data set {manifest.get('dataset')!r} has no location coordinates; the NextLocMoE "
            "model regresses coordinates (MODEL.md), so it cannot be trained on it (baselines still work)"
        )
    stats = load_stats(data_dir)
    xy = normalise_xy(load_locations(data_dir)["xy"], stats)
    return DataInfo(
        torch.tensor(xy, dtype=torch.float32), float(stats["xy_std"]), stats["x_mean"], stats["y_mean"]
    )


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{path}: not found (is {run_dir} a training run folder?)")
    return config_from_dict(yaml.safe_load(path.read_text()))


def newest_checkpoint(run_dir: str | Path) -> Path:
    """The newest *complete* checkpoint folder under run_dir/checkpoints (complete = has COMPLETE marker)."""
    root = Path(run_dir) / "checkpoints"
    done = [p for p in root.glob("step*") if (p / "COMPLETE").is_file()] if root.is_dir() else []
    if not done:
        raise RunError(f"{root}: no complete checkpoint (folders step*/ with a COMPLETE marker)")
    return max(done, key=lambda p: int(p.name.removeprefix("step")))


def load_model_state(model: NextLocMoE, ckpt_dir: str | Path) -> None:
    """Load a checkpoint folder: a consolidated single-device state dict if present, else DeepSpeed's
    per-rank / per-expert files gathered into one (any ep_size)."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / CONSOLIDATED).is_file():
        state = torch.load(ckpt_dir / CONSOLIDATED, map_location="cpu", weights_only=True)
    else:
        from nextlocmoe.model.expert_ckpt import gather_deepspeed_state

        state = gather_deepspeed_state(ckpt_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable_missing = [k for k in missing if dict(model.named_parameters())[k].requires_grad]
    if trainable_missing or unexpected:
        raise RunError(f"{ckpt_dir}: checkpoint does not match the model: missing trainable "
                       f"{trainable_missing[:5]}, unexpected {unexpected[:5]}")  # fmt: skip


def load_run(
    run_dir: str | Path, data_dir: str | Path | None = None, ckpt: str | Path | None = None
) -> tuple[Config, NextLocMoE, DataInfo]:
    """Config + single-device model with the newest complete checkpoint's weights (or ``ckpt``) + data
    info (from ``data_dir``, default the run's own data set)."""
    cfg = load_run_config(run_dir)
    info = data_info_from_dir(data_dir or cfg.data.dir)
    model = build_model(cfg.model, info)
    load_model_state(model, ckpt or newest_checkpoint(run_dir))
    return cfg, model.eval(), info
