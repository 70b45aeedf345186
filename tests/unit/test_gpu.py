"""GPU-only checks (``-m gpu``; skipped without CUDA): run by scripts/gpu_check.py on a lent GPU.
On CUDA, index_add / scatter_add use atomics, so these compare with tolerances, not bit-identity."""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_all_reduce_on_nccl() -> None:
    """The metrics collective on a one-rank NCCL group with the accelerator's tensor (CPU tensors fail)."""
    import torch.distributed as td

    from train.loop import Dist, _reduce_mean

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    td.init_process_group("nccl", rank=0, world_size=1)
    try:
        import deepspeed.comm as dist

        dist.init_distributed(dist_backend="nccl")
        got = _reduce_mean({"a": 2.0, "b": 4.0}, Dist(0, 2, 0), torch.device("cuda", 0))
        assert got == {"a": 1.0, "b": 2.0}  # world 2 in Dist: sum over one rank / 2
    finally:
        td.destroy_process_group()


def test_shared_base_experts_match_reference_on_cuda() -> None:
    """grouped (training) and static (export) shared-base compute vs the per-expert reference, on CUDA."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    from nextlocmoe.model.experts import PersonaExperts

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=128)).cuda()
    ex = PersonaExperts(mlp, r=4, alpha=4, dropout=0.0, expert_ids=list(range(4)), seed=0).cuda()
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(300, 64, device="cuda")
    ids = torch.stack([torch.randperm(4, device="cuda")[:2] for _ in range(300)])
    w = torch.rand(300, 2, device="cuda")
    ref = ex(x, ids, w, mode="naive")
    for mode in ("grouped", "static"):
        torch.testing.assert_close(ex(x, ids, w, mode=mode), ref, rtol=1e-4, atol=1e-4)


def test_cuda_device_index_matches_visible_devices() -> None:
    """The device train/launch.py binds is the one this process's LOCAL_RANK names among the visible ones
    (device 0 when one is visible, as under srun per-task binding), and work placed there runs there."""
    from train.launch import cuda_device_index

    n = torch.cuda.device_count()
    local = int(os.environ.get("LOCAL_RANK", 0))
    want = 0 if n == 1 else local
    idx = cuda_device_index(local, n)
    assert idx == want, (local, n, idx)
    x = torch.ones(4, device=f"cuda:{idx}") * 2
    assert x.device.index == idx and float(x.sum()) == 8.0
