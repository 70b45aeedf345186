"""PEFT interop: every persona expert is a standard PEFT LoRA adapter on the frozen base FFN.

``expert_as_peft(experts, e)`` returns a copy of the base FFN with PEFT's LoRA injected (adapter name =
the persona) carrying expert e's tensors, so PEFT's own forward can be compared with ours (tests) and the
adapters can be saved / shared with PEFT tooling (``peft.get_peft_model_state_dict``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nextlocmoe.model.experts import PersonaExperts


def expert_as_peft(experts: PersonaExperts, e: int, adapter_name: str = "persona") -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    ex = experts.lora[e]
    r = ex.gate_A.shape[0]
    cfg = LoraConfig(
        r=r,
        lora_alpha=experts.scaling * r,
        lora_dropout=0.0,
        target_modules=["gate_proj", "up_proj", "down_proj"],
    )
    mlp = inject_adapter_in_model(cfg, copy.deepcopy(experts.base), adapter_name=adapter_name)
    with torch.no_grad():
        for proj in ("gate", "up", "down"):
            layer = getattr(mlp, f"{proj}_proj")
            layer.lora_A[adapter_name].weight.copy_(getattr(ex, f"{proj}_A"))
            layer.lora_B[adapter_name].weight.copy_(getattr(ex, f"{proj}_B"))
    return mlp


def load_peft_adapter(experts: PersonaExperts, e: int, peft_mlp: nn.Module, adapter_name: str) -> None:
    """Copy a PEFT LoRA adapter (on a module with gate/up/down_proj) into expert e."""
    ex = experts.lora[e]
    with torch.no_grad():
        for proj in ("gate", "up", "down"):
            layer = getattr(peft_mlp, f"{proj}_proj")
            getattr(ex, f"{proj}_A").copy_(layer.lora_A[adapter_name].weight)
            getattr(ex, f"{proj}_B").copy_(layer.lora_B[adapter_name].weight)
