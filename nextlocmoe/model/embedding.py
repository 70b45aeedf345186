"""Record embedding (NextLocMoE "Record embedding"): location, weekday, hour and duration per stay record.

Shape legend: B batch, N records per window, d_loc / d_wd / d_hr / d_du the part widths, R = d_rec.
"""

from __future__ import annotations

import torch
from torch import nn

from nextlocmoe.config import EmbedConfig
from nextlocmoe.model.precision import to_param_dtype


class RecordEmbedding(nn.Module):
    """loc: Linear(2 -> d_loc, no bias) on normalised Web-Mercator (x, y); weekday Embedding(7); hour
    Embedding(24); duration Linear(1 -> d_dur) on min-max normalised log duration. Concatenated: d_rec."""

    def __init__(self, cfg: EmbedConfig) -> None:
        super().__init__()
        self.loc = nn.Linear(2, cfg.d_loc, bias=False)
        self.weekday = nn.Embedding(7, cfg.d_weekday)
        self.hour = nn.Embedding(24, cfg.d_hour)
        self.dur = nn.Linear(1, cfg.d_dur)
        self.d_rec = cfg.d_rec

    def time_part(
        self, weekday_BN: torch.Tensor, hour_BN: torch.Tensor, dur_BN: torch.Tensor
    ) -> torch.Tensor:
        """[B, N, d_wd + d_hr + d_du] in the parameters' dtype (the batch's fp32 duration is cast here)."""
        dur_BN1 = to_param_dtype(dur_BN.unsqueeze(-1), self.dur)
        return torch.cat([self.weekday(weekday_BN), self.hour(hour_BN), self.dur(dur_BN1)], -1)

    def forward(
        self, xy_BN2: torch.Tensor, weekday_BN: torch.Tensor, hour_BN: torch.Tensor, dur_BN: torch.Tensor
    ) -> torch.Tensor:
        """-> [B, N, d_rec] in the parameters' dtype: the model meets the batch here (model/precision.py)."""
        loc_BNL = self.loc(to_param_dtype(xy_BN2, self.loc))
        return torch.cat([loc_BNL, self.time_part(weekday_BN, hour_BN, dur_BN)], -1)


class TemporalBlock(nn.Module):
    """One TCN level: two dilated causal Conv1d (kernel k, dilation d) with ReLU and a residual."""

    def __init__(self, ch: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.pad = (kernel - 1) * dilation
        self.conv1 = nn.Conv1d(ch, ch, kernel, dilation=dilation)
        self.conv2 = nn.Conv1d(ch, ch, kernel, dilation=dilation)
        self.act = nn.ReLU()

    def forward(self, x_BRN: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(nn.functional.pad(x_BRN, (self.pad, 0))))
        h = self.act(self.conv2(nn.functional.pad(h, (self.pad, 0))))
        return self.act(h + x_BRN)


class HistoryEncoder(nn.Module):
    """TCN history encoder (MODEL.md): 5 levels of dilated causal convs over the H history records,
    LayerNorm, last step -> h_hist [B, d_rec]. History is left-padded, so the last step is the most recent
    real record; padded records are zeroed before the convolutions."""

    def __init__(self, d_rec: int, levels: int, kernel: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[TemporalBlock(d_rec, kernel, 2**i) for i in range(levels)])
        self.norm = nn.LayerNorm(d_rec)

    def forward(self, rec_BHR: torch.Tensor, mask_BH: torch.Tensor) -> torch.Tensor:
        x = (rec_BHR * mask_BH.unsqueeze(-1).to(rec_BHR.dtype)).transpose(1, 2)
        return self.norm(self.blocks(x)[:, :, -1])
