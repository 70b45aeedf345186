"""The decoder sequence layout [prompt ; history ; current] (S = Pn + H + C), in one place: used by the
model (attention mask), train/monitor.py (padding-free expert counts) and eval/explain.py (token pools).

Shape legend: B batch, H history records, C current records, Pn prompt tokens, S = Pn + H + C.
"""

from __future__ import annotations

import torch


def prompt_len(seq_len: int, hist_len: int, cur_len: int) -> int:
    """Pn from the sequence length S and the history / current window lengths."""
    pn = seq_len - hist_len - cur_len
    if pn < 0:
        raise ValueError(
            f"sequence of {seq_len} positions is shorter than history {hist_len} + current {cur_len}"
        )
    return pn


def sequence_mask(hist_mask_BH: torch.Tensor, prompt_tokens: int, cur_len: int) -> torch.Tensor:
    """[B, S] bool, True on real tokens: the prompt, the unpadded history records, the current window."""
    B = hist_mask_BH.shape[0]
    dev = hist_mask_BH.device
    ones_pn = torch.ones(B, prompt_tokens, dtype=torch.bool, device=dev)
    ones_c = torch.ones(B, cur_len, dtype=torch.bool, device=dev)
    return torch.cat([ones_pn, hist_mask_BH.bool(), ones_c], dim=1)
