"""Mixed-precision rules of the model, in one place (docs/TRAINING.md "Precision").

Under DeepSpeed bf16 the engine casts every parameter to bf16 but never the batch (FACTS.md). The rules:
- **inputs** are cast where the model meets the batch: the learned layers that read batch fields
  (record embedding, semantic experts) cast them to their own parameter dtype (``to_param_dtype``);
  geometry that is not learned (distances, slot features) reads the fp32 batch as it is;
- **routers, combine weights and the sum over experts** compute in fp32 (``routing.py``, the MoE layers);
- **heads** compute in fp32 from fp32 copies of their (bf16) weights (``linear32``, ``param32``), so the
  predicted point is not quantised to bf16 (~80-160 m at NYC scale) and the candidate scores are fp32;
- the **loss** is assembled in fp32 (``loss.py`` casts every prediction with ``.float()``).

Casting a parameter with ``.float()`` inside ``forward`` keeps its gradient path (the cast is
differentiable) and works under ZeRO-3 when the owning module is a ZeRO-3 leaf (train/ marks them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def param_dtype(module: nn.Module) -> torch.dtype:
    """dtype of the module's first floating parameter (fp32 if it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def to_param_dtype(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A floating batch field cast to ``module``'s parameter dtype (no copy when it already matches)."""
    return x.to(param_dtype(module)) if x.is_floating_point() else x


def param32(p: torch.Tensor) -> torch.Tensor:
    """A parameter in fp32 (no copy when it is fp32 already)."""
    return p if p.dtype == torch.float32 else p.float()


def linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed in fp32 whatever the module's dtype (heads and routers stay fp32)."""
    bias = None if layer.bias is None else param32(layer.bias)
    return F.linear(x.float(), param32(layer.weight), bias)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the parameters (not the buffers) in place, as DeepSpeed 0.19.8's bf16 engine does: buffers such
    as the location table and the routers' balancing biases stay fp32. Used by bf16 evaluation."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
