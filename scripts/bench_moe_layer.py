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


def fwd_bwd_s(ex: PersonaExperts, mode: str, x, ids, w) -> float:
    xx = x.detach().requires_grad_(True)
    ww = w.detach().requires_grad_(True)
    t = time.perf_counter()
    y = ex(xx, ids, ww, mode)
    y.float().pow(2).mean().backward()
    dt = time.perf_counter() - t
    ex.zero_grad(set_to_none=True)
    return dt


def time_modes(ex: PersonaExperts, modes: list[str], x, ids, w, repeats: int) -> dict[str, list[float]]:
    """Interleaved timings (one round = every mode once) so load changes hit all modes alike; one warm-up
    round is discarded. Returns ms per mode."""
    out: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(repeats + 1):
        for m in modes:
            dt = fwd_bwd_s(ex, m, x, ids, w) * 1000
            if i > 0:
                out[m].append(dt)
    return out


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
    modes = ["reference", "grouped", "masked"]
    for name, (ids, w) in cases.items():
        t = time_modes(ex, modes, x, ids, w, a.repeats)
        ref_min, ref_med = min(t["reference"]), statistics.median(t["reference"])
        for m in modes:
            mn, md = min(t[m]), statistics.median(t[m])
            rows.append(
                {
                    "routing": name,
                    "impl": m,
                    "min_ms": round(mn, 1),
                    "median_ms": round(md, 1),
                    "speedup_min": round(ref_min / mn, 2),
                    "speedup_median": round(ref_med / md, 2),
                }
            )
            print(
                f"{name:34s} {m:8s} min {mn:8.1f} ms  median {md:8.1f} ms  "
                f"speed-up x{ref_min / mn:.2f} (min) x{ref_med / md:.2f} (median)"
            )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
