"""Bad-input matrix: ``evaluate`` / ``explain`` / ``tokenize`` / ``train`` / ``export`` / ``bench`` cases."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration import bad_inputs_cases as bic
from tests.integration.bad_inputs_registry import TRAIN, Case, case
from tests.unit.test_checkpoint_payload import Payload


# ---- evaluate / explain / tokenize ---------------------------------------------------------------------
def _damaged(run: Path, how: str) -> Path:
    f = run / "checkpoints" / "step2" / "mp_rank_00_model_states.pt"
    if how == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    else:
        import torch

        torch.save({"module": {}, "client_state": Payload(run / "pwned")}, f)
    return run


@case
def case_evaluate_truncated_checkpoint(tmp: Path, run) -> Case:
    r = _damaged(run(), "truncate")
    argv = ["evaluate", "--run", str(r), "--max-samples", "16", "--quiet", "--out", str(tmp / "eval.json")]
    says = ("checkpoint step2 file", "mp_rank_00_model_states.pt unreadable:",
            "newest readable checkpoint: step1", "--fallback-checkpoint")  # fmt: skip
    return Case("nextlocmoe", argv, 2, says, files=[tmp / "eval.json"])


@case
def case_evaluate_fallback_checkpoint(tmp: Path, run) -> Case:
    r = _damaged(run(), "truncate")
    argv = ["evaluate", "--run", str(r), "--max-samples", "16", "--quiet", "--out", str(tmp / "eval.json"),
            "--fallback-checkpoint"]  # fmt: skip

    def after() -> None:
        rep = json.loads((tmp / "eval.json").read_text())
        assert rep["n"] == 16 and 0.0 <= rep["hit@10"] <= 1.0

    return Case("nextlocmoe", argv, 0, ("falling back to the newest readable checkpoint", "step1"), after)


@case
def case_evaluate_malicious_checkpoint(tmp: Path, run) -> Case:
    r = _damaged(run(), "payload")
    argv = ["evaluate", "--run", str(r), "--max-samples", "16", "--quiet"]
    says = ("checkpoint step2 file", "refused", "builtins.exec")
    return Case("nextlocmoe", argv, 2, says, files=[r / "pwned"])


@case
def case_evaluate_not_a_run(tmp: Path, run) -> Case:
    (tmp / "empty").mkdir()
    return Case("nextlocmoe", ["evaluate", "--run", str(tmp / "empty")], 2, ("empty/config.yaml: not found",))


@case
def case_evaluate_baselines_not_prepared(tmp: Path, run) -> Case:
    (tmp / "empty").mkdir()
    argv = ["evaluate", "--baselines-only", "--data", str(tmp / "empty"), "--out", str(tmp / "b.json")]
    return Case("nextlocmoe", argv, 2, ("empty/manifest.json: not found",), files=[tmp / "b.json"])


@case
def case_explain_truncated_checkpoint(tmp: Path, run) -> Case:
    r = _damaged(run(), "truncate")
    argv = ["explain", "--run", str(r), "--out", str(tmp / "rep"), "--max-samples", "16"]
    says = ("checkpoint step2 file", "unreadable")
    return Case("nextlocmoe", argv, 2, says, files=[tmp / "rep" / "summary.json"])


@case
def case_tokenize_bad_levels(tmp: Path, run) -> Case:
    return Case("nextlocmoe", ["tokenize", "--data", str(tmp), "--levels", "0"], 2, ("--levels >= 1",))


@case
def case_tokenize_not_prepared(tmp: Path, run) -> Case:
    return Case("nextlocmoe", ["tokenize", "--data", str(tmp)], 2, ("manifest.json: not found",),
                files=[tmp / "location_codes.json"])  # fmt: skip


# ---- train (errors found before any process group starts: one process, no launcher) --------------------
@case
def case_train_unknown_config_key(tmp: Path, run) -> Case:
    return Case("train", [*TRAIN, "train.foo=1"], 2, ("unknown config key(s) ['train.foo']",))


@case
def case_train_wrong_value_type(tmp: Path, run) -> Case:
    return Case("train", [*TRAIN, "train.steps=abc"], 2, ("train.steps", "'abc'"))


@case
def case_train_ep_size_not_dividing_experts(tmp: Path, run) -> Case:
    return Case("train", [*TRAIN, "train.ep_size=3"], 2, ("ep_size", "(4)", "(3)"))


@case
def case_train_broken_ds_config_json(tmp: Path, run) -> Case:
    (tmp / "bad.json").write_text('{"zero_optimization": {"stage": 2,}')
    argv = ["--config", "configs/debug.yaml", "--deepspeed", str(tmp / "bad.json")]
    return Case("train", argv, 2, ("bad.json: invalid JSON", "line 1 column"))


@case
def case_train_broken_config_yaml(tmp: Path, run) -> Case:
    (tmp / "bad.yaml").write_text("model: {flavour: debug\n")
    argv = ["--config", str(tmp / "bad.yaml"), "--deepspeed", "ds_configs/zero2.json"]
    return Case("train", argv, 2, ("bad.yaml: not valid YAML", "line 1, column 8"))


# ---- export / bench ------------------------------------------------------------------------------------
@case
def case_export_truncated_checkpoint(tmp: Path, run) -> Case:
    r = _damaged(run(), "truncate")
    says = ("checkpoint step2 file", "unreadable", "newest readable checkpoint: step1")
    return Case("export", ["--run", str(r), "--out", str(tmp / "eng")], 2, says, files=[tmp / "eng"])


@case
def case_bench_input_wrong_dtype(tmp: Path, run) -> Case:
    eng = bic.tiny_engine(tmp, x_dtype="float64")
    argv = ["--engines", str(eng), "--backends", "onnxruntime", "--out", str(tmp / "b.json")]
    return Case("bench", argv, 2, ("sample_inputs.npz", "input 'x': dtype float64, expected float32"),
                files=[tmp / "b.json"])  # fmt: skip


@case
def case_bench_input_wrong_shape(tmp: Path, run) -> Case:
    eng = bic.tiny_engine(tmp, x_shape=(4, 3, 1))
    argv = ["--engines", str(eng), "--backends", "torch,onnxruntime", "--out", str(tmp / "b.json")]
    return Case("bench", argv, 2, ("sample_inputs.npz", "input 'x'", "rank 3"), files=[tmp / "b.json"])


@case
def case_bench_not_an_engine(tmp: Path, run) -> Case:
    argv = ["--engines", str(tmp), "--out", str(tmp / "b.json")]
    return Case("bench", argv, 2, ("not an engine folder (no frozen.json",), files=[tmp / "b.json"])
