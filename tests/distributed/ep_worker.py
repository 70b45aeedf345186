"""Worker launched by test_expert_parallel.py under torch.distributed.run (gloo, CPU).

--mode ref (1 rank): the single-device plain-PyTorch reference and DeepSpeed ep_size=1 (ZeRO-1/2) with
    gradient accumulation 2 over the two ranks' batches (same gradients as 2-rank data parallelism).
--mode ep2 (2 ranks): ep_size=2 forward/gradient checks against the single-device layer, ZeRO-1/2 and
    ZeRO-2+CPU-offload training, parameter placement, checkpoint save + gather into the local model.
In-process checks raise (non-zero exit); cross-launch comparisons are written to --out for pytest.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import deepspeed  # noqa: E402
import torch  # noqa: E402
import toy  # noqa: E402
from deepspeed import comm as dist  # noqa: E402

from nextlocmoe.config import load_config  # noqa: E402
from nextlocmoe.model.routing import expert_counts, load_balancing_loss  # noqa: E402
from train.ds_config import build_ds_config  # noqa: E402
from train.parallel import (  # noqa: E402
    ExpertParallelDispatcher,
    attach_expert_groups,
    gather_expert_state,
    moe_param_groups,
    parallelize,
    single_device_state,
)

LR, WD, CLIP, STEPS = 1e-3, 0.01, 0.2, 3
ROUTINGS = ("topk", "threshold")
TOL = dict(atol=2e-5, rtol=1e-4)


def setup() -> None:
    # Internal switch (FACTS.md): skip compiling deepspeed_shm_comm (~58 s; inference all-reduce only).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")


def check_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if not torch.allclose(a, b, **TOL):
        raise AssertionError(f"{what}: max abs diff {(a - b).abs().max().item():.3e}")


def local_aux_loss(y, t, aux):
    """toy_loss for the single-device path, whose RoutingAux carries l_aux = 0: recompute it."""
    aux = [replace(a, l_aux=load_balancing_loss(a.probs_TE, expert_counts(a.ids_TK, toy.E))) for a in aux]
    return toy.toy_loss(y, t, aux)


def make_engine(model: torch.nn.Module, strategy: str, gas: int):
    stage = 1 if strategy == "zero1" else 2
    cfg = load_config(
        None,
        [
            f"data.batch_size={toy.B}",
            f"train.grad_accum={gas}",
            f"train.grad_clip={CLIP}",
            f"train.zero_stage={stage}",
        ],
    )
    ds = build_ds_config(ROOT / "ds_configs" / f"{strategy}.json", cfg)
    ds["steps_per_print"] = 10**9
    opt = torch.optim.AdamW(moe_param_groups(model, LR, WD), lr=LR, weight_decay=WD)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return engine


def train_ds(engine, parts: list[int]) -> list[float]:
    """STEPS optimizer steps; each step runs one micro-batch per part (gas = len(parts))."""
    losses = []
    for _ in range(STEPS):
        tot = 0.0
        step_aux = []
        for p in parts:
            x, c, t = toy.batch(p)
            y, aux = engine(x, c)
            loss = toy.toy_loss(y, t, aux)
            engine.backward(loss)
            engine.step()
            tot += loss.item()
            step_aux.append(aux)
        engine.module.balance(step_aux, _sum_over_ranks)
        losses.append(tot / len(parts))
    return losses


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def train_plain(model: torch.nn.Module) -> tuple[list[float], list[float]]:
    """Single-device reference: the mean loss over both ranks' batches, clip, torch AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        outs = [_fwd(model, p) for p in (0, 1)]
        loss = sum(local_aux_loss(*o) for o in outs) / 2
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, CLIP).item())
        opt.step()
        model.balance([o[2] for o in outs])
        losses.append(loss.item())
    return losses, norms


def clone(model: torch.nn.Module) -> torch.nn.Module:
    """deepcopy after a forward: drop the bound context/sink first (they hold non-leaf tensors)."""
    for mod in model.modules():
        if hasattr(mod, "bind"):
            mod._ctx_BC, mod._sink = None, None
    return copy.deepcopy(model)


def _fwd(model, part):
    x, c, t = toy.batch(part)
    y, aux = model(x, c)
    return y, t, aux


def run_ref(out: Path) -> None:
    res = {}
    for routing in ROUTINGS:
        m = toy.ToyMoEModel(routing)
        r = {"init": {k: v.clone() for k, v in m.state_dict().items()}}
        plain = clone(m)
        losses, norms = train_plain(plain)
        r["plain"] = {"losses": losses, "grad_norms": norms, "state": single_device_state(plain)}
        for strategy in ("zero1", "zero2"):
            md = parallelize(clone(m), 1)
            for p in (0, 1):  # the DS layer (ep=1) gives the single-device layer's output and l_aux
                y_l, _, aux_l = _fwd(m, p)
                y_d, _, aux_d = _fwd(md, p)
                check_close(y_d, y_l, f"ref {routing} forward part {p}")
                for a_l, a_d in zip(aux_l, aux_d, strict=True):
                    assert torch.equal(a_l.ids_TK, a_d.ids_TK), "routing ids differ"
                    lb = load_balancing_loss(a_l.probs_TE, expert_counts(a_l.ids_TK, toy.E))
                    check_close(a_d.l_aux, lb, "l_aux")
            engine = make_engine(md, strategy, gas=2)
            r[strategy] = {"losses": train_ds(engine, [0, 1]), "state": single_device_state(engine.module)}
        res[routing] = r
    torch.save(res, out / "ref.pt")


def check_placement(md: torch.nn.Module, rank: int) -> dict:
    """Each rank holds its experts only, the base FFN once per layer, tagged like DeepSpeed's Experts."""
    el = toy.E // 2
    info = {"lora_params": 0, "base_numel": 0}
    for name, p in md.named_parameters():
        if ".deepspeed_experts." in name:
            assert p.allreduce is False and p.group_name == "ep_size_2", name
            info["lora_params"] += 1
        else:
            assert getattr(p, "allreduce", True), name
        if ".base_ffn." in name:
            assert "expert" not in name
            info["base_numel"] += p.numel()
    for m in md.modules():
        if isinstance(m, ExpertParallelDispatcher):
            assert m.expert_ids == list(range(rank * el, rank * el + el)), m.expert_ids
            assert len(m.deepspeed_moe.experts.deepspeed_experts) == el
    n_layers = len(md.layers)
    assert info["lora_params"] == n_layers * el * 6, info
    assert info["base_numel"] == n_layers * 3 * toy.D * toy.F, info
    return info


def check_forward_and_grads(m: torch.nn.Module, rank: int) -> None:
    """ep=2 without the engine: output = single-device output; expert grads = the single-device grads of
    the SUM of both ranks' losses (tokens of both ranks reach an expert); they differ across ranks."""
    md = attach_expert_groups(parallelize(clone(m), 2))
    check_placement(md, rank)
    y_d, t, aux_d = _fwd(md, rank)
    y_l, _, aux_l = _fwd(m, rank)
    check_close(y_d, y_l, f"ep2 forward rank {rank}")
    loss_d = toy.toy_loss(y_d, t, aux_d)
    check_close(loss_d, local_aux_loss(y_l, t, aux_l), "ep2 loss")
    loss_d.backward()
    ref = clone(m)
    (local_aux_loss(*_fwd(ref, 0)) + local_aux_loss(*_fwd(ref, 1))).backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    el = toy.E // 2
    for i, blk in enumerate(md.layers):
        for j, ex in enumerate(blk.mlp.dispatcher.deepspeed_moe.experts.deepspeed_experts):
            for name, p in ex.named_parameters():
                check_close(p.grad, ref_grads[f"layers.{i}.mlp.experts.lora.{rank * el + j}.{name}"], "grad")
    g = md.layers[0].mlp.dispatcher.deepspeed_moe.experts.deepspeed_experts[0].down_B.grad
    both = [torch.empty_like(g) for _ in range(2)]
    dist.all_gather(both, g.contiguous())
    assert not torch.allclose(both[0], both[1]), "expert grads equal across ranks (averaged?)"


def check_checkpoint(engine, routing: str, out: Path, rank: int) -> None:
    """Save with ep=2, check the per-expert files, gather into the single-device model: same predictions."""
    ckpt = out / f"ckpt_{routing}"
    engine.save_checkpoint(str(ckpt), tag="step3")
    dist.barrier()
    tag_dir = ckpt / "step3"
    for layer in range(2):
        for e in range(toy.E):
            f = tag_dir / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"
            assert f.is_file(), f
            keys = list(torch.load(f, map_location="cpu", weights_only=True))
            assert len(keys) == 6 and all(".deepspeed_experts." in k for k in keys), keys
    main_path = tag_dir / "mp_rank_00_model_states.pt"
    main = torch.load(main_path, map_location="cpu", weights_only=True)["module"]
    assert not any("deepspeed_experts" in k for k in main), "expert tensors in the main file"
    assert sum(".base_ffn." in k for k in main) == 2 * 3, "the shared base FFN must be saved once per layer"
    state = gather_expert_state(ckpt, "step3")
    local = toy.ToyMoEModel(routing, seed=123)  # different init: everything must come from the checkpoint
    local.load_state_dict(state, strict=True)
    engine.module.eval()
    with torch.no_grad():
        y_d, _, _ = _fwd(engine.module, rank)
        y_l, _, _ = _fwd(local, rank)
        check_close(y_d, y_l, "gathered checkpoint predictions")
        y_1, _, _ = _fwd(parallelize(clone(local), 1), rank)  # ep=1 training start from it
        check_close(y_1, y_l, "ep=1 model from the gathered checkpoint")
    engine.module.train()


def run_ep2(out: Path) -> None:
    rank = dist.get_rank()
    res = {}
    for routing in ROUTINGS:
        m = toy.ToyMoEModel(routing)
        check_forward_and_grads(m, rank)
        r = {}
        for strategy in ("zero1", "zero2", "zero2_offload"):
            engine = make_engine(parallelize(clone(m), 2), strategy, gas=1)
            r[strategy] = {"losses": train_ds(engine, [rank]), "state": single_device_state(engine.module)}
            if strategy == "zero2":
                check_checkpoint(engine, routing, out, rank)
        res[routing] = r
    torch.save(res, out / f"ep2_rank{rank}.pt")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["ref", "ep2"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    setup()
    (run_ref if args.mode == "ref" else run_ep2)(args.out)  # on error: exit non-zero, torchrun stops the rest
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
