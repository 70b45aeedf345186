"""The training entry point end to end on 2 CPU processes (gloo, real DeepSpeed), through subprocess launches
of train/train.py exactly as a user runs it:

1. kill-and-resume: SIGKILL of the whole process group after the mid-run checkpoint, ``--resume`` continues
   the loss curve and ends on the same weights as the uninterrupted run;
2. two "nodes" on loopback (two torchrun calls, --nnodes 2) train the same job as one node with 2 processes;
3. a checkpoint saved with ep_size=2 reloads on one device (ep_size=1): it reproduces the run's eval.json, and
   its predictions equal the ep_size=2 engine's and those of an ep_size=1 engine on one rank built with
   ``train.init_from`` (fine-tuning from another ep_size), and a 1-rank fine-tuning job starts from it;
4. start-up errors are one line, non-zero, and come before any training;
5. the deepspeed launcher (``deepspeed --num_gpus 2`` on CPU) trains the same job.

Every launch costs 5-20 s on 2 cores, so one reference run (module fixture) serves tests 1, 2, 3 and 5.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nextlocmoe.data.store import TrajectoryDataset, collate
from nextlocmoe.model.expert_ckpt import gather_deepspeed_state
from nextlocmoe.model.io import load_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
STEPS, HALF = 10, 5  # the job: STEPS optimizer steps, a checkpoint at HALF and at STEPS
EVAL_SAMPLES = 200
# CPU: resume / re-launch are bit-identical (FACTS.md). CUDA: index_add / scatter_add use atomics
# (non-deterministic summation order), so a real tolerance.
REL = 1e-4 if torch.cuda.is_available() else 1e-6


def job(data: Path, out: Path, name: str, *extra: str, evaluate: bool = False) -> list[str]:
    """train/train.py arguments of the job every test here runs (ep_size=2, ZeRO-2, debug flavour)."""
    return [
        "train/train.py",
        "--config",
        "configs/debug.yaml",
        "--deepspeed",
        "ds_configs/zero2.json",
        *([] if evaluate else ["--no-eval"]),
        "train.ep_size=2",
        f"train.steps={STEPS}",
        "train.log_every=1",
        f"train.ckpt_every={HALF}",
        f"train.max_eval_samples={EVAL_SAMPLES}",
        "data.batch_size=8",
        f"data.dir={data}",
        f"train.out_dir={out}",
        f"train.name={name}",
        *extra,
    ]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    rows = metrics(run_dir)
    got = {r["step"]: r["loss"] for r in rows}
    assert len(got) == len(rows), "a step was logged twice"
    return got


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl so far (complete lines only: the file may be mid-write)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(ln)["step"] for ln in text.split("\n")[:-1] if ln]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return gather_deepspeed_state(run_dir / "checkpoints" / f"step{STEPS}")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Same keys, same values (fp32; bit-identical on CPU per FACTS.md, tolerance REL on CUDA)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max().item() if a[k].numel() else 0.0
        assert diff <= REL * (1 + a[k].float().abs().max().item()), (k, diff)
        worst = max(worst, diff)
    return worst


def assert_same_curve(got: dict[int, float], ref: dict[int, float], steps) -> None:
    for s in steps:
        assert got[s] == pytest.approx(ref[s], rel=REL), (s, got[s], ref[s])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(nyc: Path, tmp_path_factory) -> Path:
    """The uninterrupted single-node run: torchrun, 2 processes, ep_size=2, with the final eval."""
    out = tmp_path_factory.mktemp("runs")
    ok(run(torchrun("--standalone", "--nproc_per_node=2", *job(nyc, out, "ref", evaluate=True))))
    ref = out / "ref"
    assert sorted(losses(ref)) == list(range(1, STEPS + 1))
    assert (ref / "eval.json").is_file()
    for s in (HALF, STEPS):
        assert (ref / "checkpoints" / f"step{s}" / "COMPLETE").is_file()
    return ref


def test_kill_and_resume_continues_the_curve(nyc: Path, reference: Path, tmp_path: Path) -> None:
    cmd = torchrun("--standalone", "--nproc_per_node=2", *job(nyc, tmp_path, "b"))
    run_dir = tmp_path / "b"
    ckpts = run_dir / "checkpoints"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    marker = ckpts / f"step{HALF}" / "COMPLETE"
    # Kill once the step-HALF checkpoint is complete and a step past it is logged, so that --resume must
    # also drop metrics.jsonl lines written after the checkpoint (they would otherwise appear twice).
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if marker.is_file() and max(logged_steps(run_dir), default=0) > HALF:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # a real kill: the launcher and both ranks, no clean-up code runs
    proc.wait()
    assert marker.is_file(), f"run B never wrote its step-{HALF} checkpoint (exit {proc.returncode})"
    assert not (ckpts / f"step{STEPS}" / "COMPLETE").exists(), "killed too late: run B had finished"
    before = logged_steps(run_dir)
    print(f"killed after step{HALF}/COMPLETE; steps logged before the kill: {before}")
    # A kill in the middle of a later save leaves a folder without COMPLETE: --resume must skip it.
    torn = ckpts / f"step{HALF + 2}"
    torn.mkdir()
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"torn write")
    relaunch = time.time()
    ok(run(cmd + ["--resume"]))
    # It resumed from step HALF (a restart from scratch would rewrite step HALF and hide a broken resume,
    # since the data order is deterministic).
    assert json.loads(marker.read_text())["time"] < relaunch, f"step{HALF} rewritten: resume restarted"
    assert json.loads((ckpts / f"step{STEPS}" / "COMPLETE").read_text())["time"] > relaunch
    ref, got = losses(reference), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))  # no step lost or logged twice
    assert_same_curve(got, ref, range(HALF + 1, STEPS + 1))  # after the resume: optimizer + LR + data order
    assert_same_curve(got, ref, range(1, HALF + 1))
    lrs = {r["step"]: r["lr"] for r in metrics(run_dir)}
    assert lrs == {r["step"]: r["lr"] for r in metrics(reference)}
    worst = assert_same_weights(final_weights(reference), final_weights(run_dir))
    print(f"resumed curve = reference for steps {HALF + 1}..{STEPS}; max |weight diff| {worst:.2e}")


def test_two_nodes_on_loopback_train_the_same_job(nyc: Path, reference: Path, tmp_path: Path) -> None:
    port = free_port()
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]  # files, not pipes: a full pipe would stall a rank
    nodes = [
        subprocess.Popen(torchrun("--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1",
                                  "--master_addr=127.0.0.1", f"--master_port={port}",
                                  *job(nyc, tmp_path, "two")),
                         cwd=ROOT, env=ENV, stdout=logs[r].open("w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
        for r in (0, 1)
    ]  # fmt: skip
    try:
        deadline = time.time() + 300
        while any(n.poll() is None for n in nodes) and time.time() < deadline:
            time.sleep(0.1)
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
                n.wait()
    assert all(n.returncode == 0 for n in nodes), "\n".join(f.read_text()[-2000:] for f in logs)
    ref, got = losses(reference), losses(tmp_path / "two")
    assert got.keys() == ref.keys()
    assert_same_curve(got, ref, ref)
    assert_same_weights(final_weights(reference), final_weights(tmp_path / "two"))


def _predict(model: torch.nn.Module, data_dir: str):
    sys.path.insert(0, str(ROOT / "tests" / "distributed"))
    from predict_worker import SAMPLES

    batch = collate(TrajectoryDataset(data_dir, "test", pointer=model.pointer_window).get_batch(SAMPLES))
    with torch.no_grad():
        return model(batch)


def test_ep2_checkpoint_reloads_on_one_device(reference: Path, tmp_path: Path) -> None:
    from nextlocmoe.eval.evaluate import evaluate_model

    cfg, model, _ = load_run(reference)  # single device = ep_size 1: experts gathered from per-expert files
    # (a) it reproduces the metrics the training run wrote
    report = evaluate_model(model, cfg.data.dir, "test", cfg.data.eval_batch_size, cfg.model.heads.ranking,
                            cfg.train.max_eval_samples)  # fmt: skip
    written = json.loads((reference / "eval.json").read_text())
    assert written["n"] == EVAL_SAMPLES
    provenance = ("run", "ranks", "device", "precision")  # where the in-job (sharded) evaluation ran
    assert json.loads(json.dumps(report)) == {k: v for k, v in written.items() if k not in provenance}
    pred, aux = _predict(model, cfg.data.dir)
    # (b) the same predictions as the ep_size=2 engine on 2 ranks (engine.load_checkpoint), and
    # (c) as an ep_size=1 engine on one rank built with train.init_from=<the ep_size=2 run>
    worker = "tests/distributed/predict_worker.py"
    for nproc, extra in ((2, []), (1, ["1"])):
        out = tmp_path / f"pred{nproc}.pt"
        ok(run(torchrun("--standalone", f"--nproc_per_node={nproc}", worker, str(reference),
                        "ds_configs/zero2.json", str(out), *extra)))  # fmt: skip
        eng = torch.load(out, weights_only=True)
        assert eng["ep_size"] == (2 if nproc == 2 else 1)
        assert torch.allclose(pred.xy, eng["xy"], atol=1e-5), (pred.xy - eng["xy"]).abs().max()
        diff = (pred.scores - eng["scores"]).abs().max()
        assert torch.allclose(pred.scores, eng["scores"], atol=1e-4), diff
        for a, ids in zip(aux.personal, eng["ids"], strict=True):
            assert torch.equal(a.ids_TK, ids.to(a.ids_TK.dtype))  # same experts chosen for every token


def test_fine_tune_from_another_ep_size(nyc: Path, reference: Path, tmp_path: Path) -> None:
    """``train.init_from=<the ep_size=2 run>`` on one rank at ep_size=1: a new run (steps from 1, fresh
    optimizer) that starts from the reference's final weights, so its first logged loss is the reloaded
    single-device model's loss on the same first batch."""
    from nextlocmoe.model.build import build_model
    from nextlocmoe.model.io import load_run_config
    from nextlocmoe.model.loss import compute_loss
    from train.loop import Dist, StepBatches

    args = job(nyc, tmp_path, "ft", "train.ep_size=1", f"train.init_from={reference}", "train.steps=2")
    p = run(torchrun("--standalone", "--nproc_per_node=1", *args))
    ok(p)
    ckpt = reference / "checkpoints" / f"step{STEPS}"
    assert f"train: initialised from {ckpt}" in p.stdout, p.stdout[-2000:]
    ft = tmp_path / "ft"
    assert load_run_config(ft).train.init_from == str(reference)  # the resolved config records it
    got = losses(ft)
    assert sorted(got) == [1, 2]
    cfg, model, info = load_run(reference)
    train_ds = TrajectoryDataset(nyc, "train", pointer=cfg.model.pointer_window)
    batch = StepBatches(train_ds, 8, Dist(0, 1, 0), cfg.train.seed)(0)

    def first_loss(m: torch.nn.Module) -> float:
        with torch.no_grad():
            pred, aux = m.train()(batch)
            return compute_loss(pred, aux, batch, cfg.loss, info.xy_std_m).total.item()

    want = first_loss(model)
    assert got[1] == pytest.approx(want, rel=1e-5), (got[1], want)
    torch.manual_seed(cfg.train.seed)  # the same job without init_from would start from these weights
    cold = first_loss(build_model(cfg.model, info))
    assert abs(cold - want) > 0.01 * abs(want), (cold, want)


ZERO3 = "Native DeepSpeed MoE is not supported with ZeRO Stage 3"


@pytest.mark.parametrize(
    ("nproc", "extra", "ds_json", "message"),
    [
        (1, ["train.ep_size=1", "train.zero_stage=3"], {"zero_optimization": {"stage": 3}}, ZERO3),
        (2, ["train.zero_stage=3"], {"zero_optimization": {"stage": 3}}, ZERO3),
        (1, ["train.ep_size=1"], {"train_micro_batch_size_per_gpu": 99, "zero_optimization": {"stage": 2}},
         "train_micro_batch_size_per_gpu=99"),
        (1, ["train.ep_size=3"], None, "must be divisible by train.ep_size (3)"),
        (1, [], None, "train.ep_size=2 must divide the world size 1"),
    ],
    ids=["zero3-ep1", "zero3-ep2-2ranks", "micro-batch-conflict", "ep3-experts", "ep2-world1"],
)  # fmt: skip
def test_startup_errors_are_early_and_one_line(nyc, tmp_path, nproc, extra, ds_json, message) -> None:
    args = job(nyc, tmp_path, "bad", *extra)
    if ds_json is not None:
        (tmp_path / "ds.json").write_text(json.dumps(ds_json))
        args[args.index("ds_configs/zero2.json")] = str(tmp_path / "ds.json")
    t = time.time()
    p = run(torchrun("--standalone", f"--nproc_per_node={nproc}", *args), timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("train: error:")]
    assert p.returncode != 0 and lines, p.stderr[-2000:]
    assert message in lines[0], lines  # the entry's one-line reason, not a traceback from deep inside
    deep = [ln for ln in p.stderr.splitlines() if "train/loop.py" in ln or "site-packages/deepspeed" in ln]
    assert not deep, deep  # no traceback through our loop or DeepSpeed (torchrun's own summary is fine)
    # before any training: no step ran, nothing was logged or saved
    assert not (tmp_path / "bad" / "checkpoints").exists()
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    assert time.time() - t < 120


def test_deepspeed_launcher_trains_the_same_job(nyc: Path, reference: Path, tmp_path: Path) -> None:
    """``deepspeed --num_gpus 2`` on CPU (FACTS.md: --num_gpus is needed without GPUs; the script gets
    --local_rank). OMP_NUM_THREADS=1 comes from our environment (the launcher does not set it)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.is_file():
        pytest.skip(f"no deepspeed launcher beside {sys.executable}")
    p = run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), *job(nyc, tmp_path, "ds")])
    ok(p)
    ref, got = losses(reference), losses(tmp_path / "ds")
    assert got.keys() == ref.keys()
    assert_same_curve(got, ref, ref)
    assert_same_weights(final_weights(reference), final_weights(tmp_path / "ds"))


FAKE_SRUN = '''#!{python}
"""srun stand-in on one machine: SLURM_NNODES x --ntasks-per-node tasks of the command, with the
SLURM_* variables a real srun sets per task; --kill-on-bad-exit (a task fails -> the others are killed)."""
import os, subprocess, sys, time
args, per_node = sys.argv[1:], 1
while args and args[0].startswith("-"):
    a = args.pop(0)
    if a.startswith("--ntasks-per-node="):
        per_node = int(a.split("=", 1)[1])
nodes = int(os.environ["SLURM_NNODES"])
procs = [
    subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": str(n), "SLURM_LOCALID": str(i),
                                "SLURM_PROCID": str(n * per_node + i),
                                "SLURM_NTASKS": str(nodes * per_node)}})
    for n in range(nodes) for i in range(per_node)
]
while any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs):
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.05)
sys.exit(max(abs(p.returncode) for p in procs))
'''


@pytest.mark.parametrize(("launch", "nodes"), [("torchrun", 2), ("srun", 2), ("srun", 1)])
def test_slurm_wrapper_trains_the_same_job(
    nyc: Path, reference: Path, tmp_path: Path, launch: str, nodes: int
) -> None:
    """train/slurm.sbatch on fake "nodes" (srun / scontrol stand-ins on this machine): LAUNCH=torchrun (one
    torchrun per node) and LAUNCH=srun (train.py per task, SLURM_* -> RANK/WORLD_SIZE in train/launch.py);
    srun with 2 tasks on 1 node gives rank 1 SLURM_LOCALID=1 (the per-task binding case, on CPU)."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (shims / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\necho 127.0.0.2\n")
    for f in shims.iterdir():
        f.chmod(0o755)
    env = {**ENV, "PATH": f"{shims}:{ENV['PATH']}", "LAUNCH": launch, "PYTHON": sys.executable,
           "SLURM_JOB_NODELIST": "fake[0-1]", "SLURM_NNODES": str(nodes), "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": str(ROOT), "NPROC_PER_NODE": str(2 // nodes),
           "MASTER_PORT": str(free_port())}  # fmt: skip
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(k, None)
    args = job(nyc, tmp_path, "slurm")[1:]  # CONFIG DS ... without the script name
    args = [args[1], args[3], *args[4:]]  # sbatch takes CONFIG DS positionally, then the rest
    sbatch = str(ROOT / "train" / "slurm.sbatch")  # run from elsewhere: it must cd to $SLURM_SUBMIT_DIR
    proc = subprocess.Popen(["bash", sbatch, *args], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert f"{launch}, {nodes} node(s) x {2 // nodes} process(es), rendezvous 127.0.0.1" in out
    ref, got = losses(reference), losses(tmp_path / "slurm")
    assert got.keys() == ref.keys()
    assert_same_curve(got, ref, ref)
