"""Reading checkpoint files that may come from someone else, without executing pickled code.

``torch.load(weights_only=False)`` unpickles arbitrary objects, and an object's ``__reduce__`` can run any
function on load: a run folder received from someone else could execute code on ``evaluate``, ``explain``,
``export`` or ``train.init_from``. Every checkpoint file is read here with ``weights_only=True`` (tensors,
containers, numbers, strings only) plus an explicit allow-list of further types.

What DeepSpeed 0.19.8 writes (inspected with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on a
2-rank ZeRO-2, ep_size=2 run of the debug config): ``mp_rank_00_model_states.pt`` and the per-expert
``layer_*_expert_*_mp_rank_00_model_states.pt`` hold tensors, ``OrderedDict``, lists, dicts, ints, floats,
strings and ``None`` only (``module``, ``param_shapes``, ``frozen_param_fragments``, ``lr_scheduler``,
``ds_config``, ``ds_version``, ``global_steps``, ...): the allow-list for them is empty. The optimizer files
(``zero_pp_rank_*_optim_states.pt``) also hold DeepSpeed classes (``LossScaler``, ``fragment_address``,
``ZeroStageEnum``); nothing in ``nextlocmoe`` reads them.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

# Non-tensor types allowed beyond torch's weights_only defaults in the files nextlocmoe reads. Empty for
# DeepSpeed 0.19.8's model-states files (see the module docstring); add a type only after inspecting a file.
MODEL_STATES_ALLOWED: list[Any] = []


class CheckpointReadError(ValueError):
    """A checkpoint file cannot be read, or holds something that is not plain data; names file and step."""


def _unsafe_globals(path: Path) -> list[str]:
    """Names of the non-allow-listed globals a torch checkpoint file refers to (read without unpickling)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - diagnosis only; the load error itself is reported
        return []


def safe_torch_load(path: str | Path, label: str = "checkpoint", allowed: list[Any] | None = None) -> Any:
    """``torch.load`` of ``path`` on CPU with ``weights_only=True`` and ``allowed`` extra types (default
    MODEL_STATES_ALLOWED). Any failure raises CheckpointReadError "<label> file <path> ...": refused (the
    file pickles a type outside the allow-list, e.g. a code-running payload; nothing of it is executed) or
    unreadable (truncated, not a torch file, I/O error)."""
    path = Path(path)
    extra = MODEL_STATES_ALLOWED if allowed is None else allowed
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        names = _unsafe_globals(path)
        if not names:
            raise CheckpointReadError(f"{label} file {path} unreadable: {_core(e)}") from None
        raise CheckpointReadError(
            f"{label} file {path} refused: it holds pickled object(s) of type {names}, outside the "
            "allow-list of plain checkpoint data (tensors, containers, numbers, strings); loading them "
            "could run code, so nothing of the file was loaded"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as e:
        size = f"{path.stat().st_size} bytes, " if path.is_file() else ""
        raise CheckpointReadError(
            f"{label} file {path} unreadable: {_core(e)} ({size}truncated, damaged or not a torch file?)"
        ) from None


def _core(e: BaseException) -> str:
    """The informative part of a torch.load error, on one line (torch's weights_only advice dropped)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("\n\n")[0]
    text = " ".join(text.split())
    if text.startswith("PytorchStreamReader") and ". " in text:  # drop miniz's paragraph of advice
        text = text.split(". ")[0]
    return text[:200] or type(e).__name__
