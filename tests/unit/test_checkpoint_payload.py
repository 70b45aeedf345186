"""A checkpoint carrying a pickled code payload is refused and the payload never runs.

Uses only what main already had (``gather_deepspeed_state``): before the safe loader (``torch.load(...,
weights_only=False)``) this test failed: the payload ran and nothing was raised."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nextlocmoe.model.expert_ckpt import gather_deepspeed_state


class Payload:
    """Unpickling this object runs code (creates ``marker``): what a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _ds_checkpoint(run: Path, step: int, extra: dict | None = None) -> Path:
    """A DeepSpeed-layout checkpoint folder: mp_rank_00 (dense) + one per-expert file, COMPLETE marker."""
    tag = run / "checkpoints" / f"step{step}"
    tag.mkdir(parents=True)
    key = "decoder.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts.0.lora_A"
    torch.save({"module": {"head.weight": torch.full((2, 2), float(step))}, **(extra or {})},
               tag / "mp_rank_00_model_states.pt")  # fmt: skip
    torch.save({key: torch.ones(3)}, tag / "layer_0_expert_0_mp_rank_00_model_states.pt")
    (tag / "COMPLETE").write_text("")
    return tag


def test_malicious_checkpoint_is_refused_without_running(tmp_path: Path) -> None:
    """A model-states file carrying a ``__reduce__`` payload is refused; the payload never runs."""
    marker = tmp_path / "pwned"
    tag = _ds_checkpoint(tmp_path / "run", 5, {"client_state": Payload(marker)})
    with pytest.raises(ValueError) as e:  # CheckpointReadError
        gather_deepspeed_state(tag)
    msg = str(e.value)
    assert "checkpoint step5" in msg and "mp_rank_00_model_states.pt" in msg and "refused" in msg
    assert "builtins.exec" in msg and "\n" not in msg
    assert not marker.exists(), "the pickled payload ran"
    # the payload is real: an unrestricted load does run it (what `weights_only=False` did before)
    torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert marker.exists()
