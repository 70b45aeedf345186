"""Model <-> files: data info from a prepared folder, single-device state dicts, loading a training run
(DeepSpeed checkpoint with per-expert files, any ep_size) into the single-device model.

Only ``torch.load`` of DeepSpeed's files is needed here (no deepspeed import): the key mapping from the
expert-parallel layer back to the single-device ``PersonalMoE`` lives in ``expert_ckpt.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import yaml

from nextlocmoe.config import Config, config_from_dict
from nextlocmoe.data.store import load_locations, load_manifest, load_stats, normalise_xy
from nextlocmoe.model.build import TEXT_STATE, rebuild_model
from nextlocmoe.model.nextlocmoe import DataInfo, NextLocMoE
from nextlocmoe.model.safe_load import CheckpointReadError, safe_torch_load

log = logging.getLogger(__name__)
CONSOLIDATED = "model_state.pt"  # single-device state dict written beside DeepSpeed checkpoints


class RunError(ValueError):
    """A run folder is incomplete or inconsistent; the message names the file."""


def data_info_from_dir(data_dir: str | Path, stats_dir: str | Path | None = None) -> DataInfo:
    """Location table (normalised coords) and normalisation stats of a prepared data set (the stats of
    ``stats_dir`` instead when given: zero-shot ``--normalise source``)."""
    manifest = load_manifest(data_dir)
    if not manifest.get("has_coordinates", False):
        raise RunError(
            f"{data_dir}: data set {manifest.get('dataset')!r} has no location coordinates; the NextLocMoE "
            "model regresses coordinates (MODEL.md), so it cannot be trained on it (baselines still work)"
        )
    stats = load_stats(stats_dir or data_dir)
    xy = normalise_xy(load_locations(data_dir)["xy"], stats)
    cols = ("loc", "user", "hour", "weekday", "split")  # the exploration head's train-split counts
    records = {c: np.load(Path(data_dir) / "records" / f"{c}.npy", mmap_mode="r") for c in cols}
    return DataInfo(
        torch.tensor(xy, dtype=torch.float32),
        float(stats["xy_std"]),
        stats["x_mean"],
        stats["y_mean"],
        records,
    )


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{path}: not found (is {run_dir} a training run folder?)")
    return config_from_dict(yaml.safe_load(path.read_text()))


def resolve_data_dir(run_dir: str | Path, data_dir: str) -> Path:
    """The run's training data folder (``data.dir`` as saved): an absolute one as it is; a relative one as
    given (the working directory it was trained from), else relative to the run folder or one of its
    parents; else the run's sibling of the same name (a moved ``demo-out/``). RunError naming the tries when
    none holds a ``manifest.json`` (pass the data folder explicitly: ``--data``)."""
    p, run = Path(data_dir), Path(run_dir).resolve()
    if p.is_absolute():
        tries = [p, run.parent / p.name]
    else:
        tries = [p, run / p, *(a / p for a in run.parents), run.parent / p.name]
    for t in tries:
        if (t / "manifest.json").is_file():
            return t
    shown = [str(t) for t in tries[:2]] + ["...", str(tries[-1])]
    raise RunError(f"{run_dir}: training data folder data.dir={data_dir!r} not found (tried {shown}); "
                   "pass the prepared data folder with --data")  # fmt: skip


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders (step<N>/ with a COMPLETE marker) under run_dir/checkpoints, newest
    first; RunError when there is none."""
    root = Path(run_dir) / "checkpoints"
    done = [
        p
        for p in (root.glob("step*") if root.is_dir() else [])
        if p.name.removeprefix("step").isdigit() and (p / "COMPLETE").is_file()
    ]
    if not done:
        raise RunError(f"{root}: no complete checkpoint (folders step*/ with a COMPLETE marker)")
    return sorted(done, key=lambda p: int(p.name.removeprefix("step")), reverse=True)


def newest_checkpoint(run_dir: str | Path) -> Path:
    """The newest *complete* checkpoint folder under run_dir/checkpoints (complete = has COMPLETE marker)."""
    return complete_checkpoints(run_dir)[0]


def readable_checkpoint(run_dir: str | Path, fallback: bool = False) -> tuple[Path, dict]:
    """(folder, state dict) of the run's newest complete checkpoint. When it cannot be read, the error
    names its file and step and the newest older checkpoint that reads; with ``fallback``
    (``--fallback-checkpoint`` of evaluate / explain / export) that older one is used instead, with a
    warning."""
    ckpts = complete_checkpoints(run_dir)
    try:
        return ckpts[0], read_model_state(ckpts[0])
    except CheckpointReadError as e:
        first = e
    for older in ckpts[1:]:
        try:
            state = read_model_state(older)
        except CheckpointReadError:
            continue
        if fallback:
            log.warning("%s; falling back to the newest readable checkpoint %s", first, older)
            return older, state
        raise CheckpointReadError(
            f"{first}; newest readable checkpoint: {older.name} ({older}); rerun with --fallback-checkpoint "
            "to use it"
        ) from None
    raise CheckpointReadError(f"{first}; no older complete checkpoint of {run_dir} reads either") from None


def read_model_state(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint folder's single-device state dict: the consolidated file if present, else DeepSpeed's
    per-rank / per-expert files gathered into one (any ep_size)."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / CONSOLIDATED).is_file():
        state = safe_torch_load(ckpt_dir / CONSOLIDATED, f"checkpoint {ckpt_dir.name}")
        if not isinstance(state, dict):
            raise CheckpointReadError(f"checkpoint {ckpt_dir.name} file {ckpt_dir / CONSOLIDATED} "
                                      "unreadable: not a state dict")  # fmt: skip
        return state
    from nextlocmoe.model.expert_ckpt import gather_deepspeed_state

    return gather_deepspeed_state(ckpt_dir)


def load_model_state(
    model: NextLocMoE, ckpt_dir: str | Path, state: dict | None = None, skip: tuple[str, ...] = ()
) -> None:
    """Load a checkpoint folder (``read_model_state``, or its already-read ``state``) into the model;
    keys in ``skip`` are left as the model has them."""
    ckpt_dir = Path(ckpt_dir)
    state = dict(read_model_state(ckpt_dir) if state is None else state)
    for k in skip:
        state.pop(k, None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters())
    trainable_missing = [k for k in missing if k in params and params[k].requires_grad and k not in skip]
    trainable_missing += [k for k in missing if k.endswith(TEXT_STATE)]  # rebuilt models: text semantics
    if trainable_missing or unexpected:
        raise RunError(f"{ckpt_dir}: checkpoint does not match the model: missing trainable "
                       f"{trainable_missing[:5]}, unexpected {unexpected[:5]}")  # fmt: skip


# Scored-head entries that belong to the training data set's location table (docs/EXPLAIN.md, zero-shot).
LOCATION_KEYS = (
    "scored.loc_emb.weight", "scored.loc_bias.weight", "scored.loc_xy_L2", "scored.novel.visits_L",
    "scored.novel.visits_LT", "scored.novel.succ_ids_LK", "scored.novel.succ_cnt_LK",
    "scored.novel.covis_ids_LK", "scored.novel.covis_cnt_LK", "scored.novel.users_L",
)  # fmt: skip


def foreign_locations(state: dict[str, torch.Tensor], info: DataInfo) -> bool:
    """True when the checkpoint's scored head was built on another location table than ``info``'s
    (different size or coordinates): the per-location embeddings cannot be used on ``info``'s data."""
    saved = state.get("scored.loc_xy_L2")
    if saved is None:
        return False
    xy = info.loc_xy_norm
    return saved.shape != xy.shape or not torch.allclose(saved.float(), xy, atol=1e-4)


def checkpoint_dir(path: str | Path) -> Path:
    """``path`` as a checkpoint folder: a training run folder gives its newest complete checkpoint; a
    ``step<N>`` folder with its COMPLETE marker is taken as it is."""
    path = Path(path)
    if (path / "COMPLETE").is_file():
        return path
    if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
        return newest_checkpoint(path)
    raise RunError(f"{path}: neither a training run folder (config.yaml, checkpoints/) nor a complete "
                   "checkpoint folder (checkpoints/step<N>/ with COMPLETE)")  # fmt: skip


def load_weights(
    model: NextLocMoE,
    ckpt: str | Path,
    info: DataInfo,
    state: dict | None = None,
    foreign: bool | None = None,
) -> bool:
    """Load a checkpoint folder saved with any ep_size into the single-device ``model`` built on ``info``'s
    data. When the checkpoint's scored head belongs to another location table (another data set) its
    per-location entries (LOCATION_KEYS) are skipped and the model keeps its own; returns True then.
    A checkpoint of another model shape raises RunError naming the folder. ``state``: ``ckpt``'s already
    read state dict; ``foreign``: the caller's ``foreign_locations`` verdict (None: decided here)."""
    state = read_model_state(ckpt) if state is None else state
    if foreign is None:
        foreign = model.scored is not None and foreign_locations(state, info)
    try:
        load_model_state(model, ckpt, state, skip=LOCATION_KEYS if foreign else ())
    except RuntimeError as e:  # size mismatches: another model config
        detail = " ".join(str(e).split())[:300]
        raise RunError(f"{ckpt}: checkpoint does not fit this model config ({detail})") from None
    return foreign


def load_run(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    ckpt: str | Path | None = None,
    normalise: str = "target",
    fallback: bool = False,
) -> tuple[Config, NextLocMoE, DataInfo]:
    """Config + single-device model with the newest complete checkpoint's weights (or ``ckpt``) + data
    info (from ``data_dir``, default the run's own data set).

    Cross-domain (zero-shot, docs/EXPLAIN.md): when ``data_dir``'s location table is not the one the run
    was trained on, the scored head gets ``data_dir``'s table (candidates = target locations only) and its
    per-location embedding term is dropped (zeroed; ``model.location_transfer`` says so), keeping the
    distance and visit-count terms. ``normalise``: "target" uses ``data_dir``'s stats.json, "source" the
    run's training data set's (``cfg.data.dir`` must exist)."""
    if normalise not in ("target", "source"):
        raise ValueError(f"normalise must be 'target' or 'source', not {normalise!r}")
    cfg = load_run_config(run_dir)
    if data_dir is None or normalise == "source":
        cfg.data.dir = str(resolve_data_dir(run_dir, cfg.data.dir))
    state = None
    if ckpt is None:  # read first: an unreadable checkpoint fails before the model is built
        ckpt, state = readable_checkpoint(run_dir, fallback)
    stats_dir = cfg.data.dir if normalise == "source" else None
    info = data_info_from_dir(data_dir or cfg.data.dir, stats_dir)
    if state is None:
        state = read_model_state(ckpt)
    foreign = cfg.model.heads.pointer or cfg.model.heads.scored
    foreign = foreign and foreign_locations(state, info)
    transfer = "per-location embedding term dropped (source-city embeddings)" if foreign else None
    model = rebuild_model(cfg.model, info, transfer)
    load_weights(model, ckpt, info, state, foreign)
    if foreign:
        with torch.no_grad():  # (the retrieval head has no per-place parameters: nothing to drop)
            for name in ("loc_emb", "loc_bias"):  # the pointer head has a location bias too
                if hasattr(model.scored, name):
                    getattr(model.scored, name).weight.zero_()
    return cfg, model.eval(), info
