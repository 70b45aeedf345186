"""DeepSpeed MoE checkpoint (any ep_size) -> single-device state dict, with no deepspeed import.

DeepSpeed writes ``mp_rank_00_model_states.pt`` (dense params under ``module``) and one
``layer_{L}_expert_{e}_mp_rank_00_model_states.pt`` per global expert (keys with the global expert id).
Keys of the expert-parallel dispatcher (``train/parallel.py``) map back to ``PersonalMoE`` names here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from nextlocmoe.model.safe_load import CheckpointReadError, safe_torch_load

_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
LORA_KEY = re.compile(r"^(.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)$")


def local_lora_key(moe_prefix: str, gid: int | str, name: str) -> str:
    """The single-device key of global expert ``gid``'s LoRA tensor ``name``, from the prefix of the
    DeepSpeed MoE module that holds it (``<layer>.dispatcher``; ``<layer>`` in checkpoints written before
    the dispatcher seam)."""
    return f"{moe_prefix.removesuffix('.dispatcher')}.experts.lora.{gid}.{name}"


def to_local_key(key: str) -> str:
    """One expert-parallel state-dict key (global expert id) -> the PersonalMoE key; others unchanged."""
    m = LORA_KEY.match(key)
    if m:
        return local_lora_key(m.group(1), m.group(2), m.group(3))
    key = key.replace(".deepspeed_moe.gate.router.", ".router.")  # checkpoints before the dispatcher seam
    return key.replace(".dispatcher.base_ffn.", ".experts.base.").replace(".base_ffn.", ".experts.base.")


def gather_deepspeed_state(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """Merge one DeepSpeed checkpoint folder (any ep_size) into the single-device model's names.

    Files are read without executing pickled code (``safe_load``); a file that cannot be read or holds
    anything but plain checkpoint data raises CheckpointReadError naming the step and the file."""
    tag_dir = Path(tag_dir)
    label = f"checkpoint {tag_dir.name}"
    main_path = tag_dir / "mp_rank_00_model_states.pt"
    if not main_path.is_file():
        raise FileNotFoundError(f"no DeepSpeed model states at {main_path}")
    main = safe_torch_load(main_path, label)
    if not isinstance(main, dict) or not isinstance(main.get("module"), dict):
        raise CheckpointReadError(f"{label} file {main_path} unreadable: no 'module' state dict in it")
    state = dict(main["module"])
    for path in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        if _EXPERT_FILE.search(path.name):
            part = safe_torch_load(path, label)
            if not isinstance(part, dict):
                raise CheckpointReadError(f"{label} file {path} unreadable: not a state dict")
            state.update(part)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointReadError(f"{label} in {tag_dir}: non-tensor model entries {bad[:5]}")
    out = {to_local_key(k): v for k, v in state.items()}
    leftover = [k for k in out if "deepspeed_moe" in k]
    if leftover:
        raise ValueError(f"unmapped DeepSpeed MoE keys in {tag_dir}: {leftover[:5]}")
    return out
