"""The config tree: YAML + overrides, validation naming the field, round trip of the resolved config."""

from __future__ import annotations

import pytest

from nextlocmoe.config import ConfigError, config_from_dict, config_to_dict, load_config, save_config


def test_debug_and_reference_flavours_load() -> None:
    d = load_config("configs/debug.yaml")
    r = load_config("configs/reference.yaml")
    assert d.model.backbone.path is None
    pm = r.model.personal_moe
    assert (pm.num_experts, pm.start_layer, pm.every, pm.lora_r, pm.tau, pm.k_max) == (11, 8, 2, 16, 0.8, 5)
    assert r.model.backbone.num_layers == 12 and r.loss.entropy_weight == 300.0
    assert r.model.moe_layers() == [8, 10]


def test_overrides_are_typed() -> None:
    c = load_config(
        "configs/debug.yaml",
        [
            "train.steps=7",
            "model.personal_moe.routing=threshold",
            "model.backbone.path=null",
            "loss.entropy_weight=1e-3",
        ],
    )
    assert c.train.steps == 7 and c.model.personal_moe.routing == "threshold"
    assert c.loss.entropy_weight == pytest.approx(1e-3)


def test_string_overrides_keep_their_text(tmp_path) -> None:
    """YAML 1.1 reads off/no/yes/007 as booleans / ints; a str field takes the text as typed."""
    c = load_config("configs/debug.yaml", ["train.name=off", "model.prompt=007", "model.backbone.path=null"])
    assert c.train.name == "off" and c.model.prompt == "007" and c.model.backbone.path is None
    p = tmp_path / "c.yaml"
    p.write_text("train: {name: off}\n")
    with pytest.raises(ConfigError, match="train.name: expected a string, got the boolean False"):
        load_config(p)
    p.write_text("train: {name: 'off'}\n")
    assert load_config(p).train.name == "off"


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.ep_size=3", "divisible by train.ep_size"),
        ("model.personal_moe.routing=topp", "routing must be"),
        ("model.personal_moe.k_max=9", "k_max"),
        ("train.steps=abc", "train.steps: expected int"),
        ("model.nope=1", "unknown config key"),
        ("model.personal_moe.start_layer=5", "start_layer"),
        ("train.precision=fp16", "precision"),
    ],
)
def test_invalid_values_name_the_field(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config("configs/debug.yaml", [override])


def test_resolved_config_round_trip(tmp_path) -> None:
    c = load_config("configs/debug.yaml", ["train.steps=11"])
    save_config(c, tmp_path / "config.yaml")
    c2 = load_config(tmp_path / "config.yaml")
    assert config_to_dict(c2) == config_to_dict(c) and config_from_dict(config_to_dict(c)) == c


def test_removed_keys_of_older_runs_are_dropped_and_compute_names_unified() -> None:
    """model.flavour / data.num_workers (read by nothing) load from an older run's config.yaml and are
    dropped; the older expert-compute names map to the one vocabulary (model/experts.py)."""
    c = load_config(None, ["model.flavour=debug", "data.num_workers=2", "model.personal_moe.compute=dense"])
    assert not hasattr(c.model, "flavour") and not hasattr(c.data, "num_workers")
    assert c.model.personal_moe.compute == "masked"
    with pytest.raises(ConfigError, match="grouped|masked"):
        load_config(None, ["model.personal_moe.compute=folded"])  # inference form only
