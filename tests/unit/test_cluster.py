"""Issue 12 defects, CPU unit level: the documented launch recipes load, device-aware collectives, the
final evaluation after teardown, fp32 gradient reduction in gpu_bf16.json, the CUDA device under srun
binding, train.moe_parallel validation, expert-load statistics and capacity-factor token dropping."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from nextlocmoe.config import ConfigError, load_config
from train.ds_config import build_ds_config

ROOT = Path(__file__).resolve().parents[2]


def _documented_reference_overrides() -> list[list[str]]:
    """section.key=value overrides of every documented command that launches configs/reference.yaml."""
    cmds = []
    for path in (ROOT / "docs" / "TRAINING.md", ROOT / "train" / "slurm.sbatch", ROOT / "README.md"):
        text = re.sub(r"\\\n\s*#?", " ", path.read_text())  # join continued lines (also in # comments)
        for line in text.splitlines():
            if "configs/reference.yaml" in line and "slurm.sbatch" in line:
                cmds.append(re.findall(r"(?<=\s)[a-z_]+\.[a-z_.]+=[^\s`]+", line))
    return cmds


def test_documented_reference_recipes_load() -> None:
    cmds = _documented_reference_overrides()
    assert len(cmds) >= 3, cmds  # TRAINING.md (2) + slurm.sbatch (1)
    for overrides in cmds:
        cfg = load_config(ROOT / "configs" / "reference.yaml", overrides)  # ep_size=8 with 11 experts fails
        assert cfg.model.personal_moe.num_experts % cfg.train.ep_size == 0


def test_config_refuses_ep_size_8_with_11_experts() -> None:
    with pytest.raises(ConfigError, match=r"num_experts \(11\) must be divisible by train.ep_size \(8\)"):
        load_config(ROOT / "configs" / "reference.yaml", ["train.ep_size=8"])


def test_world_size_must_be_divisible_by_ep_size() -> None:
    from train.launch import check_world

    check_world(2, 4)
    with pytest.raises(ValueError, match="train.ep_size=4 must divide the world size 6"):
        check_world(4, 6)


def test_moe_parallel_validation() -> None:
    assert load_config(None, ["train.moe_parallel=replicated"]).train.moe_parallel == "replicated"
    rep = "train.moe_parallel=replicated"
    cases = [
        (["train.moe_parallel=tensor"], "expert|replicated"),
        ([rep, "train.ep_size=2", "model.personal_moe.num_experts=4"], "needs train.ep_size=1"),
        ([rep, "train.capacity_factor=1.25"], "expert only"),
    ]
    for bad, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, bad)


def test_metrics_all_reduce_uses_the_given_device(monkeypatch) -> None:
    """NCCL has no CPU backend: the tensor handed to the collective must be on the accelerator's device."""
    import deepspeed.comm as dist

    from train.loop import Dist, _reduce_mean

    seen = []

    def fake_all_reduce(t, *a, **k):
        seen.append(t.device)
        if t.device.type == "meta":
            raise StopIteration  # a meta tensor cannot be read back; the device is what we check
        t.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    assert _reduce_mean({"a": 1.0, "b": 3.0}, Dist(0, 2, 0), "cpu") == {"a": 1.0, "b": 3.0}
    with pytest.raises(StopIteration):
        _reduce_mean({"a": 1.0}, Dist(0, 2, 0), torch.device("meta"))
    assert seen == [torch.device("cpu"), torch.device("meta")]


ARGS = [
    "--config",
    str(ROOT / "configs" / "debug.yaml"),
    "--deepspeed",
    str(ROOT / "ds_configs" / "zero2.json"),
]


class _Exit(Exception):
    pass


def _entry(monkeypatch, rank: int, train_run):
    """train/train.py's main with the process group, training and final eval replaced by recorders."""
    import train.launch as launch
    import train.loop as loop
    import train.train as entry

    calls: list = []
    # the entry imports these from train.launch after its cheap config checks: patch them there
    monkeypatch.setattr(launch, "init_process_group", lambda cfg: loop.Dist(rank, 2, rank))
    monkeypatch.setattr(launch, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(loop, "train_run", train_run(calls))  # startup=True errors come from here
    monkeypatch.setattr(launch, "final_eval", lambda run_dir, cfg, d: calls.append(("eval", d.rank)))

    def fake_exit(code: int) -> None:
        calls.append(("exit", code))
        raise _Exit

    monkeypatch.setattr(launch.os, "_exit", fake_exit)
    return entry, calls


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_evaluates_its_shard_then_shuts_down(monkeypatch, tmp_path, rank: int) -> None:
    """The final evaluation is sharded over the ranks (eval/sharded.py): every rank takes part, inside the
    process group, and the normal shutdown (barrier + destroy) comes after it."""
    entry, calls = _entry(monkeypatch, rank, lambda calls: lambda *a, **k: calls.append("train") or tmp_path)
    assert entry.main(ARGS) == 0
    assert calls == ["train", ("eval", rank), "shutdown"]


def test_an_error_on_a_rank_exits_at_once_without_a_barrier(monkeypatch, tmp_path, capsys) -> None:
    """Defect 2 of issue 18: a rank that raised entered dist.barrier() in a finally while the others sat
    in a ZeRO collective (a 10-minute hang). Now: traceback, one line naming rank / step / source line,
    os._exit, and no shutdown (no barrier)."""
    from train.loop import StepFailure

    def failing(calls):
        def run(*a, **k):
            calls.append("train")
            try:
                raise RuntimeError("CUDA out of memory (injected)")
            except RuntimeError as e:
                raise StepFailure(3) from e

        return run

    entry, calls = _entry(monkeypatch, 1, failing)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(_Exit):
        entry.main(ARGS)
    assert calls == ["train", ("exit", 1)]  # no "shutdown", no "eval"
    err = capsys.readouterr().err
    assert "Traceback" in err
    line = [ln for ln in err.splitlines() if ln.startswith("train: error:")]
    assert len(line) == 1 and "rank 1 failed: step 3: RuntimeError: CUDA out of memory (injected)" in line[0]
    assert "test_cluster.py:" in line[0]  # the source line that raised


def test_expected_errors_are_one_line_exit_2(monkeypatch, tmp_path, capsys) -> None:
    from nextlocmoe.model.io import RunError

    def bad(calls):
        def run(*a, **k):
            raise RunError("runs/x/metrics.jsonl: unreadable line 'oops'")

        return run

    entry, calls = _entry(monkeypatch, 0, bad)
    with pytest.raises(_Exit):
        entry.main(ARGS)
    assert calls == [("exit", 2)]
    err = capsys.readouterr().err
    assert (
        "Traceback" not in err and err.strip() == "train: error: runs/x/metrics.jsonl: unreadable line 'oops'"
    )


def test_srun_binding_starts_the_group_on_device_0(monkeypatch) -> None:
    """Defect 1 of issue 18: under srun --gpus-per-task=1 (one visible GPU, SLURM_LOCALID=3) DeepSpeed's
    init_distributed passes device_id=cuda:$LOCAL_RANK and torch raises "device_id cuda:3 is out of range".
    The group is now started before DeepSpeed with this process's device (cuda:0); DeepSpeed only creates
    its device_id when torch.distributed is not yet initialised (checked against its source)."""
    import inspect

    import deepspeed
    import torch.distributed as tdist
    from deepspeed.comm.torch import TorchBackend

    import train.launch as launch
    from nextlocmoe.config import load_config

    src = inspect.getsource(TorchBackend.init_process_group)
    assert "if not torch.distributed.is_initialized()" in src and "LOCAL_RANK" in src
    for k, v in {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3"}.items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # recorded, so what train.launch writes into os.environ is undone too
        monkeypatch.delenv(k)
    state = {"init": False, "calls": []}

    def fake_init(backend=None, **kw):
        dev = kw.get("device_id")
        if dev is not None and dev.index >= 1:  # what torch does with one visible device
            raise RuntimeError(f"device_id {dev} is out of range")
        state["calls"].append((backend, dev))
        state["init"] = True

    def fake_ds_init(dist_backend=None, timeout=None, **kw):
        state["calls"].append(("deepspeed", tdist.is_initialized()))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: state["calls"].append(("set_device", i)))
    monkeypatch.setattr(tdist, "init_process_group", fake_init)
    monkeypatch.setattr(tdist, "is_initialized", lambda: state["init"])
    monkeypatch.setattr(deepspeed, "init_distributed", fake_ds_init)
    import deepspeed.comm as dsc

    monkeypatch.setattr(dsc, "get_rank", lambda: 3)
    monkeypatch.setattr(dsc, "get_world_size", lambda: 4)
    d = launch.init_process_group(load_config(ROOT / "configs" / "debug.yaml"))
    assert state["calls"] == [("set_device", 0), ("nccl", torch.device("cuda", 0)), ("deepspeed", True)]
    assert (d.rank, d.world, d.local_rank, d.device_index) == (3, 4, 3, 0)


def test_gpu_bf16_reduces_gradients_in_fp32() -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config(ROOT / "configs" / "mid.yaml", ["train.precision=bf16"])
    ds = build_ds_config(ROOT / "ds_configs" / "gpu_bf16.json", cfg, 8)
    parsed = DeepSpeedConfig(json.loads(json.dumps(ds)))
    assert parsed.bfloat16_config.enabled
    assert parsed.communication_data_type == torch.float32  # DeepSpeed's default under bf16 is bf16
    assert parsed.grad_accum_dtype == "fp32"
    z = parsed.zero_config
    assert z.overlap_comm and z.stage == 2
    # ~20 M trainable params at the reference size: several buckets, so reduction overlaps backward
    assert z.reduce_bucket_size <= 5e6 and z.allgather_bucket_size <= 5e6


@pytest.mark.parametrize(("local", "visible", "want"), [(3, 1, 0), (0, 1, 0), (3, 8, 3), (7, 8, 7)])
def test_cuda_device_under_srun_binding(local: int, visible: int, want: int) -> None:
    from train.launch import cuda_device_index

    assert cuda_device_index(local, visible) == want  # LOCAL_RANK=3 with one visible device -> device 0


def test_cuda_device_errors() -> None:
    from train.launch import cuda_device_index

    with pytest.raises(ValueError, match="LOCAL_RANK=4 but only 2"):
        cuda_device_index(4, 2)
    with pytest.raises(ValueError, match="no device is visible"):
        cuda_device_index(0, 0)


def test_expert_stats() -> None:
    from train.monitor import expert_stats

    s = expert_stats([6.0, 2.0, 0.0, 0.0], capacity=4, world=2, dispatched=10.0, dropped=1.0, routed=11.0)
    assert s["tokens"] == 8 and s["dead"] == 2
    assert s["min_load"] == 0.0 and s["max_load"] == pytest.approx(0.75)
    assert s["capacity"] == 4 and s["padding_ratio"] == pytest.approx(1 - 10 / 32)
    assert s["dropped_share"] == pytest.approx(1 / 11)
    assert expert_stats([1.0, 1.0])["padding_ratio"] == 0.0  # replicated: no capacity buffers


def test_padding_tokens_excluded_from_load() -> None:
    from nextlocmoe.model.routing import expert_counts
    from train.monitor import token_mask

    batch = {"hist_mask": torch.tensor([[1, 0], [1, 1]]), "cur_xy": torch.zeros(2, 1, 2)}
    mask = token_mask(batch, tokens=2 * 4)  # S = 1 prompt + 2 history + 1 current
    assert mask.tolist() == [True, True, False, True, True, True, True, True]
    ids = torch.tensor([[0], [1], [2], [0], [0], [0], [0], [0]])
    assert expert_counts(ids, 3, mask).tolist() == [6.0, 1.0, 0.0]  # the padded token's expert 2 not counted


def test_capacity_factor_drops_tokens() -> None:
    from train.parallel import sparse_routes_from_selection

    T, E = 8, 2
    probs = torch.full((T, E), 0.5)
    ids = torch.zeros(T, 1, dtype=torch.long)  # every token on expert 0
    w = torch.ones(T, 1)
    stats: dict = {}
    out = sparse_routes_from_selection(probs, ids, w, None, capacity_factor=1.0, stats=stats)
    capacity, indices, gates = out[1], out[3], out[5]
    assert int(capacity) == 4  # ceil(1.0 * 8 tokens * 1 slot / 2 experts)
    assert indices[0].tolist() == [0] * 4 + [-1] * 4 and gates[0].tolist() == [1.0] * 4 + [0.0] * 4
    assert int(stats["dropped"]) == 4 and int(stats["routed"]) == 8 and int(stats["dispatched"]) == 4
    out = sparse_routes_from_selection(probs, ids, w, None, 0.0, stats)
    assert int(out[1]) == 8 and int(stats["dropped"]) == 0  # no dropping: capacity = the largest load
