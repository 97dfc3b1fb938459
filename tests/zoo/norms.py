"""Per-row normalisation layers: LayerNorm and GroupNorm rows."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNormHeads(nn.Module):
    """Per-variable heads: Linear → LayerNorm → GELU on x[:, v], stacked."""

    def __init__(self, v=4, d=12, p=8, bias=True):
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(d, p), nn.LayerNorm(p, bias=bias),
                                                 nn.GELU()) for _ in range(v))

    def forward(self, x):
        return torch.stack([head(x[:, i]) for i, head in enumerate(self.heads)], dim=1)


class LayerNormTower(nn.Module):
    """Conv1d → LayerNorm(L) → ReLU → Conv1d per row of x[:, :, h]."""

    def __init__(self, h=3, c=3, length=16):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(c, 6, 3, padding=1) for _ in range(h))
        self.norms = nn.ModuleList(nn.LayerNorm(length) for _ in range(h))
        self.outs = nn.ModuleList(nn.Conv1d(6, 4, 3) for _ in range(h))

    def forward(self, x):
        rows = [self.outs[h](F.relu(self.norms[h](self.convs[h](x[:, :, h]))))
                for h in range(len(self.convs))]
        return torch.stack(rows, dim=2)


class FunctionalLayerNorm(nn.Module):
    """``F.layer_norm`` with per-row weight and bias parameters."""

    def __init__(self, h=3, d=10):
        super().__init__()
        self.d = d
        self.lin = nn.ModuleList(nn.Linear(d, d) for _ in range(h))
        for i in range(h):
            setattr(self, f"w{i}", nn.Parameter(torch.randn(d)))
            setattr(self, f"b{i}", nn.Parameter(torch.randn(d)))

    def forward(self, x):
        return torch.cat([F.layer_norm(self.lin[h](x[:, h]), (self.d,), getattr(self, f"w{h}"),
                                       getattr(self, f"b{h}"), 1e-6)
                          for h in range(len(self.lin))], dim=-1)


class GroupNormTower(nn.Module):
    """Conv1d → GroupNorm(2, C) → SiLU per row."""

    def __init__(self, h=4, c=3):
        super().__init__()
        self.rows = nn.ModuleList(nn.Sequential(nn.Conv1d(c, 8, 3, padding=1), nn.GroupNorm(2, 8),
                                                nn.SiLU()) for _ in range(h))

    def forward(self, x):
        return torch.stack([row(x[:, :, h]) for h, row in enumerate(self.rows)], dim=2)


class MultiDimLayerNorm(nn.Module):
    """LayerNorm over (C, L) of a conv row: it mixes a row's channels, left alone."""

    def __init__(self, h=3, c=3, length=16):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(c, 6, 3, padding=1) for _ in range(h))
        self.norms = nn.ModuleList(nn.LayerNorm((6, length)) for _ in range(h))

    def forward(self, x):
        return torch.stack([self.norms[h](self.convs[h](x[:, :, h]))
                            for h in range(len(self.convs))], dim=2)
