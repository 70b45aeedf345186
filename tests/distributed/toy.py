"""A tiny stand-in for the full model: residual blocks whose FFN is a PersonalMoE over a HF LlamaMLP.

Used by the distributed workers until ``nextlocmoe.model.nextlocmoe.build_model`` is the test subject. The
blocks sit at ``layers[i].mlp`` like a decoder's, the LoRA B tensors are random and nonzero (so experts
differ) and the data (x, context, target) is fixed per seed.

Shape legend: B batch, S sequence, D model width, C context width, P persona width, E experts.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from nextlocmoe.config import PersonalMoEConfig
from nextlocmoe.model.balance import balance_routers
from nextlocmoe.model.personal_moe import PersonalMoE, RoutingContext
from nextlocmoe.model.routing import RoutingAux

D, F, C, P, E = 32, 64, 8, 12, 4
BALANCE_RATE = 0.3  # large, so that the selection bias changes choices within the test's 3 steps
B, S = 4, 6  # per rank


def moe_cfg(routing: str) -> PersonalMoEConfig:
    return PersonalMoEConfig(
        num_experts=E,
        lora_r=4,
        lora_alpha=8.0,
        lora_dropout=0.0,
        routing=routing,
        top_k=2,
        tau=0.6,
        k_max=3,
        router_hidden=16,
    )


class Block(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp


class ToyMoEModel(nn.Module):
    """x_BSD, ctx_BC -> y_BSD; two residual PersonalMoE blocks, a trainable context projection."""

    def __init__(self, routing: str, n_layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        cfg = moe_cfg(routing)
        persona_EP = torch.randn(E, P, generator=gen)
        self.ctx_proj = nn.Linear(C, C)
        self.routing = RoutingContext()
        blocks = []
        for i in range(n_layers):
            base = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F))
            base.requires_grad_(False)
            blocks.append(Block(PersonalMoE(base, cfg, persona_EP, C, i, self.routing, seed)))
        self.layers = nn.ModuleList(blocks)
        with torch.no_grad():
            for blk in self.layers:
                for ex in blk.mlp.experts.lora:
                    for name in ("gate_B", "up_B", "down_B"):
                        getattr(ex, name).copy_(0.3 * torch.randn(getattr(ex, name).shape, generator=gen))

    def balance(self, step_aux: list[list[RoutingAux]], reduce=None) -> None:
        """Auxiliary-loss-free balancing after an optimizer step (model/balance.py) from the routing of the
        step's micro-batches; ``reduce`` sums the counts over ranks."""
        pairs = [(blk.mlp.router.sel_bias_E, [a[i] for a in step_aux]) for i, blk in enumerate(self.layers)]
        balance_routers(pairs, BALANCE_RATE, reduce)

    def forward(self, x_BSD: torch.Tensor, ctx_BC: torch.Tensor) -> tuple[torch.Tensor, list[RoutingAux]]:
        with self.routing.scope(self.ctx_proj(ctx_BC)) as records:
            for blk in self.layers:
                x_BSD = x_BSD + blk.mlp(x_BSD)
        return x_BSD, records


def batch(part: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed data for one rank's share ``part``: x [B, S, D], ctx [B, C], target [B, S, D]."""
    gen = torch.Generator().manual_seed(seed * 100 + part)
    x_BSD, ctx_BC = torch.randn(B, S, D, generator=gen), torch.randn(B, C, generator=gen)
    return x_BSD, ctx_BC, torch.randn(B, S, D, generator=gen)


def toy_loss(y_BSD: torch.Tensor, target_BSD: torch.Tensor, aux: list[RoutingAux]) -> torch.Tensor:
    """mean squared error + 0.01 * sum of the layers' load-balancing losses."""
    return torch.mean((y_BSD - target_BSD) ** 2) + 0.01 * sum(a.l_aux for a in aux)
