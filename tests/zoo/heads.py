"""Per-variable Linear heads (forecasting style)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Heads(nn.Module):
    """Per-variable ``Linear(L, P)`` heads on ``x[:, i, :]``, stacked (forecasting style)."""

    def __init__(self, v=6, length=16, p=4, bias=True):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(length, p, bias=bias) for _ in range(v))

    def forward(self, x):
        return torch.stack([head(x[:, i, :]) for i, head in enumerate(self.heads)], dim=1)


class HeadsIntoBuffer(Heads):
    """``out = torch.zeros(...); out[:, i, :] = heads[i](x[:, i, :])`` with a shape-bound loop."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], x.shape[1], self.heads[0].out_features)
        for i in range(x.shape[1]):
            out[:, i, :] = self.heads[i](x[:, i, :])
        return out


class ScalarHeads(nn.Module):
    """``Linear(1, h)`` per variable: a broadcast multiply-add."""

    def __init__(self, v=5, h=7):
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(1, h) for _ in range(v))

    def forward(self, x):
        return torch.stack([F.relu(e(x[:, i].unsqueeze(-1))) for i, e in enumerate(self.embed)], 1)


class SummedHeads(Heads):
    def forward(self, x):
        return torch.stack([head(x[:, i]) for i, head in enumerate(self.heads)], 0).sum(0)
