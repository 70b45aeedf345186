"""Checkpoint files from someone else: no pickled code runs (see also test_checkpoint_payload.py), and read
errors name the file and the step; an older readable checkpoint is offered or, on request, used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nextlocmoe.model.expert_ckpt import gather_deepspeed_state
from nextlocmoe.model.io import RunError, complete_checkpoints, readable_checkpoint
from nextlocmoe.model.safe_load import CheckpointReadError, safe_torch_load
from tests.unit.test_checkpoint_payload import Payload, _ds_checkpoint


def test_plain_deepspeed_layout_reads(tmp_path: Path) -> None:
    state = gather_deepspeed_state(_ds_checkpoint(tmp_path, 3, {"global_steps": 3, "ds_version": "0.19.8"}))
    assert state["head.weight"].sum().item() == 12.0
    assert "decoder.layers.1.mlp.experts.lora.0.lora_A" in state


def test_malicious_expert_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    tag = _ds_checkpoint(tmp_path / "run", 2)
    torch.save({"x": Payload(marker)}, tag / "layer_0_expert_0_mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointReadError, match=r"checkpoint step2 file .*layer_0_expert_0_mp_rank_00"):
        gather_deepspeed_state(tag)
    assert not marker.exists()


def test_truncated_file_names_file_and_step_and_offers_older(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _ds_checkpoint(run, 100)
    new = _ds_checkpoint(run, 300)
    f = new / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointReadError) as e:
        gather_deepspeed_state(new)
    assert str(e.value).startswith(f"checkpoint step300 file {f} unreadable: ")
    with pytest.raises(CheckpointReadError) as e:
        readable_checkpoint(run, fallback=False)
    msg = str(e.value)
    assert "step300" in msg and "newest readable checkpoint: step100" in msg
    assert "--fallback-checkpoint" in msg
    ckpt, state = readable_checkpoint(run, fallback=True)
    assert ckpt.name == "step100" and state["head.weight"].sum().item() == 400.0


def test_no_readable_checkpoint_at_all(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (1, 2):
        (_ds_checkpoint(run, step) / "mp_rank_00_model_states.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointReadError, match="step2 .*unreadable.*no older complete checkpoint"):
        readable_checkpoint(run, fallback=True)
    assert [p.name for p in complete_checkpoints(run)] == ["step2", "step1"]
    with pytest.raises(RunError, match="no complete checkpoint"):
        complete_checkpoints(tmp_path / "empty")


def test_safe_load_non_torch_file(tmp_path: Path) -> None:
    p = tmp_path / "model_state.pt"
    p.write_text("hello")
    with pytest.raises(CheckpointReadError, match=r"^checkpoint x file .*model_state.pt unreadable"):
        safe_torch_load(p, "checkpoint x")
