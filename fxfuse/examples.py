"""Built-in example models: the per-row Conv1d loop as people write it.

``RowConv1d`` is the seed question's model: H=10 groups of C=15 correlated series of
length W=100, batched as (32, 15, 10, 100), one independent ``Conv1d`` per row.
``RowConvNet`` is the larger model around it: a joint ``Conv2d(C, C, (1, k))`` over all
rows plus the per-row loop, summed, then a linear head.
"""
from __future__ import annotations

import torch
from torch import nn

SEED_SHAPE = (32, 15, 10, 100)


class RowConv1d(nn.Module):
    """One ``Conv1d`` per row ``h`` of ``x[:, :, h, :]``, results stacked back on dim 2."""

    def __init__(self, channels: int = 15, rows: int = 10, kernel_size: int = 3) -> None:
        super().__init__()
        self.rows = rows
        self.layers = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
            for _ in range(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for h in range(self.rows):
            outs.append(self.layers[h](x[:, :, h, :]).unsqueeze(2))
        return torch.cat(outs, dim=2)


class RowConvNet(nn.Module):
    """Joint (1, k) Conv2d over all rows + the per-row loop, summed, then a head."""

    def __init__(self, channels: int = 15, rows: int = 10, kernel_size: int = 3,
                 classes: int = 4) -> None:
        super().__init__()
        self.joint = nn.Conv2d(channels, channels, (1, kernel_size),
                               padding=(0, kernel_size // 2))
        self.per_row = RowConv1d(channels, rows, kernel_size)
        self.head = nn.Linear(channels * rows, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.joint(x) + self.per_row(x))
        return self.head(y.mean(dim=3).flatten(1))


def seed_model() -> nn.Module:
    """The seed model, in eval mode (a factory for ``fxfuse fuse fxfuse.examples:seed_model``)."""
    torch.manual_seed(0)
    return RowConv1d().eval()


def seed_net() -> nn.Module:
    """The larger model around the seed loop, in eval mode."""
    torch.manual_seed(0)
    return RowConvNet().eval()
