"""Micro-benchmark: personalized-MoE expert compute, shared-base (grouped / static) vs the reference math
(each selected expert's full LoRA FFN), forward + backward, on CPU.

    python scripts/bench_moe_layer.py [--d-model 1024 --d-ff 2816 --experts 11 --tokens 512 --repeats 5]

Prints one row per (routing, implementation): median ms fwd+bwd and the speed-up over the reference.
Not a test: timings depend on the machine; the equality of the three is proven in tests/unit/test_experts.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from nextlocmoe.model.experts import PersonaExperts
from nextlocmoe.model.routing import select


def time_fwd_bwd(ex: PersonaExperts, mode: str, x, ids, w, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        xx = x.detach().requires_grad_(True)
        ww = w.detach().requires_grad_(True)
        t = time.perf_counter()
        y = ex(xx, ids, ww, mode=mode)
        y.float().pow(2).mean().backward()
        if i > 0:  # first run is warm-up
            times.append(time.perf_counter() - t)
        ex.zero_grad(set_to_none=True)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=2816)
    ap.add_argument("--experts", type=int, default=11)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=a.d_model, intermediate_size=a.d_ff))
    for p in mlp.parameters():
        p.requires_grad_(False)
    ex = PersonaExperts(
        mlp, r=a.rank, alpha=float(a.rank), dropout=0.0, expert_ids=list(range(a.experts)), seed=0
    )
    with torch.no_grad():
        for lora in ex.lora:
            for p in lora.parameters():
                p.normal_(0, 0.02)
    x = torch.randn(a.tokens, a.d_model)
    probs = torch.softmax(torch.randn(a.tokens, a.experts), -1)
    cases = {
        "topk k=2": select(probs, "topk", 2, 0.8, 5),
        "5 experts/token (threshold cap)": select(probs, "threshold", 2, 1.0, 5),
    }
    rows = []
    print(f"D={a.d_model} F={a.d_ff} E={a.experts} T={a.tokens} r={a.rank} threads={torch.get_num_threads()}")
    for name, (ids, w) in cases.items():
        ref = time_fwd_bwd(ex, "naive", x, ids, w, a.repeats)
        for mode in ("naive", "grouped", "static"):
            ms = ref if mode == "naive" else time_fwd_bwd(ex, mode, x, ids, w, a.repeats)
            rows.append(
                {"routing": name, "impl": mode, "ms_fwd_bwd": round(ms, 2), "speedup": round(ref / ms, 2)}
            )
            print(f"{name:34s} {mode:8s} {ms:9.1f} ms  x{ref / ms:.2f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
