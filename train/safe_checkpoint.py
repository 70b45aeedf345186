"""``--resume`` without running pickled code (issue 21).

DeepSpeed 0.19.8 reads every checkpoint file of ``engine.load_checkpoint`` (model states, per-expert files,
ZeRO optimizer shards) through ``engine.checkpoint_engine.load``, which is ``torch.load(weights_only=False)``:
a ``__reduce__`` payload in any of them runs on load. ``safe_loads(engine)`` routes that method, for the
duration of the load, through ``nextlocmoe.model.safe_load.safe_torch_load`` (``weights_only=True``) with
the exact DeepSpeed types its files hold as the allow-list: inspected with
``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO-1/2/3, fp32/bf16, expert and replicated runs,
the optimizer shards hold ``ZeroStageEnum``, ``LossScaler`` and ``fragment_address``; model-state files
hold plain data only. A file holding anything else is refused with one line naming it; nothing of it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from nextlocmoe.model.safe_load import safe_torch_load


def deepspeed_allowed() -> list[Any]:
    """The DeepSpeed classes DeepSpeed 0.19.8's checkpoint files pickle (module docstring)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextmanager
def safe_loads(engine) -> Iterator[None]:
    """Within the block, ``engine``'s checkpoint reads are ``weights_only=True`` with the allow-list."""
    ce = engine.checkpoint_engine
    allowed = deepspeed_allowed()

    def load(path: str, map_location: Any = None) -> Any:  # DeepSpeed moves tensors where it needs them
        return safe_torch_load(path, "resume checkpoint", allowed)

    ce.load = load  # instance attribute: shadows the class method for this engine only
    try:
        yield
    finally:
        del ce.load
