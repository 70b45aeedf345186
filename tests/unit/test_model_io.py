"""Weights from a checkpoint folder into the single-device model (nextlocmoe.model.io): the path behind
``train.init_from`` (fine-tuning) and ``load_run`` (evaluate / export / explain)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from nextlocmoe.model.build import build_model
from nextlocmoe.model.io import CONSOLIDATED, LOCATION_KEYS, RunError, checkpoint_dir, load_weights
from nextlocmoe.model.nextlocmoe import DataInfo


def _checkpoint(model: torch.nn.Module, root: Path, step: int = 3) -> Path:
    """A run folder with one complete checkpoint holding the consolidated single-device state."""
    ckpt = root / "checkpoints" / f"step{step}"
    ckpt.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt / CONSOLIDATED)
    (ckpt / "COMPLETE").write_text("{}")
    return ckpt


def test_checkpoint_dir_resolves_run_and_checkpoint_folders(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (2, 10):
        (run / "checkpoints" / f"step{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step{step}" / "COMPLETE").write_text("{}")
    (run / "checkpoints" / "step20").mkdir()  # torn write: no COMPLETE marker
    assert checkpoint_dir(run) == run / "checkpoints" / "step10"
    assert checkpoint_dir(run / "checkpoints" / "step2") == run / "checkpoints" / "step2"
    with pytest.raises(RunError, match="neither a training run folder"):
        checkpoint_dir(tmp_path / "nothing")
    with pytest.raises(RunError, match="neither a training run folder"):
        checkpoint_dir(run / "checkpoints" / "step20")


def _records(n_loc: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = 300
    cols = {"loc": rng.integers(0, n_loc, n), "user": np.sort(rng.integers(0, 5, n))}
    cols.update(hour=rng.integers(0, 24, n), weekday=rng.integers(0, 7, n), split=rng.choice([0, 0, 1, 2], n))
    return cols


@pytest.mark.parametrize(("novelty", "covisit"), [(False, 0), (True, 0), (True, 4)])
def test_load_weights_same_and_other_location_table(
    debug_cfg, tmp_path: Path, novelty: bool, covisit: int
) -> None:
    """Another data set keeps its own location entries, with the exploration head its own city counts
    (co-visitation lists included)."""
    cfg = copy.deepcopy(debug_cfg.model)
    cfg.heads.novelty, cfg.heads.novelty_covisit = novelty, covisit
    torch.manual_seed(0)
    src_info = DataInfo(torch.randn(40, 2), 1000.0, records=_records(40, 0))
    src = build_model(cfg, src_info)
    ckpt = _checkpoint(src, tmp_path / "run")
    want = src.state_dict()
    if novelty:
        assert want["scored.novel.visits_L"].sum() > 0
    if covisit:
        assert want["scored.novel.covis_cnt_LK"].sum() > 0

    torch.manual_seed(1)  # another init: every loaded tensor must change to the source's
    same_info = DataInfo(src.scored.loc_xy_L2.clone(), 1000.0)  # no records: zero counts until loaded
    same = build_model(cfg, same_info)
    assert load_weights(same, ckpt, same_info) is False
    for k, v in same.state_dict().items():
        assert torch.equal(v, want[k]), k

    torch.manual_seed(1)
    other_info = DataInfo(torch.randn(25, 2), 1000.0, records=_records(25, 1))  # another data set: 25 places
    other = build_model(cfg, other_info)
    own = {k: v.clone() for k, v in other.state_dict().items() if k in LOCATION_KEYS}
    assert any(k.startswith("scored.novel.") for k in own) == novelty
    assert load_weights(other, ckpt, other_info) is True
    for k, v in other.state_dict().items():
        assert torch.equal(v, own[k] if k in LOCATION_KEYS else want[k]), k


def test_load_weights_of_another_model_shape_names_the_folder(debug_cfg, tmp_path: Path) -> None:
    info = DataInfo(torch.randn(30, 2), 1000.0)
    ckpt = _checkpoint(build_model(debug_cfg.model, info), tmp_path / "run")
    wider = copy.deepcopy(debug_cfg.model)
    wider.personal_moe.lora_r = 8
    with pytest.raises(RunError, match=r"step3: checkpoint does not fit this model config"):
        load_weights(build_model(wider, info), ckpt, info)


def test_checkpoint_rebuild_never_runs_the_text_encoder(debug_cfg, tmp_path: Path, monkeypatch) -> None:
    """``rebuild_model`` (what load_run builds) takes the text semantics from the checkpoint: with the text
    encoder made to fail, the rebuilt model equals the saved one, buffers included; a checkpoint without
    them is refused instead of silently keeping the zero placeholders."""
    from nextlocmoe.model import text
    from nextlocmoe.model.build import rebuild_model

    info = DataInfo(torch.randn(30, 2), 1000.0)
    src = build_model(debug_cfg.model, info)
    assert src.moe_layers()[0].router.persona_EP.abs().sum() > 0
    ckpt = _checkpoint(src, tmp_path / "run")

    def no_encoder(*a, **k):
        raise AssertionError("the text encoder ran during a checkpoint rebuild")

    monkeypatch.setattr(text, "embed_texts", no_encoder)
    with pytest.raises(AssertionError, match="text encoder ran"):
        build_model(debug_cfg.model, info)  # a fresh model does run it
    model = rebuild_model(debug_cfg.model, info)
    assert model.moe_layers()[0].router.persona_EP.abs().sum() == 0  # placeholders until loaded
    load_weights(model, ckpt, info)
    want = src.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    state = {k: v for k, v in want.items() if not k.endswith("persona_EP")}
    with pytest.raises(RunError, match="persona_EP"):
        load_weights(rebuild_model(debug_cfg.model, info), ckpt, info, state)
