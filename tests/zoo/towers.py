"""Per-row towers and other conv loops beyond one conv per row (chains, groups, sums,
sites in sequence), and loops among them that must be left alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def convs(n, c_in, c_out, k=3, **kw):
    return nn.ModuleList(nn.Conv1d(c_in, c_out, k, padding=k // 2, **kw) for _ in range(n))


class Tower(nn.Module):
    """Sequential(Conv1d, BatchNorm1d, ReLU, Dropout, Conv1d) per row."""

    def __init__(self, h=4, c=3):
        super().__init__()
        self.rows = nn.ModuleList(nn.Sequential(
            nn.Conv1d(c, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
            nn.Conv1d(8, 5, 3)) for _ in range(h))

    def forward(self, x):
        return torch.stack([row(x[:, :, h]) for h, row in enumerate(self.rows)], dim=2)


class FunctionalChain(nn.Module):
    """``F.gelu(conv_h(x_h).contiguous()) * 0.5 + 1.0`` per row, then ``cat`` on channels."""

    def __init__(self, h=5):
        super().__init__()
        self.convs = convs(h, 3, 4)

    def forward(self, x):
        return torch.cat([F.gelu(c(x[:, :, i]).contiguous()) * 0.5 + 1.0
                          for i, c in enumerate(self.convs)], 1)


class TwoKernels(nn.Module):
    """Rows alternate two kernel sizes ('same' padding): fused as two groups."""

    def __init__(self, h=6):
        super().__init__()
        self.rows = nn.ModuleList(nn.Conv1d(3, 4, 3 if i % 2 else 5, padding="same")
                                  for i in range(h))

    def forward(self, x):
        return torch.stack([r(x[:, :, h]) for h, r in enumerate(self.rows)], dim=2)


class Subset(nn.Module):
    """Rows 4, 1, 3 only, in that order: gathered."""

    def __init__(self):
        super().__init__()
        self.convs = convs(3, 3, 4)

    def forward(self, x):
        return torch.stack([c(x[:, :, r]) for c, r in zip(self.convs, (4, 1, 3))], dim=2)


class TwoSites(nn.Module):
    """Site 2 reads site 1's result through a ReLU: the layout flows through."""

    def __init__(self, h=4, c=6):
        super().__init__()
        self.a, self.b, self.h = convs(h, c, c), convs(h, c, c), h

    def forward(self, x):
        y = torch.stack([self.a[i](x[:, :, i]) for i in range(self.h)], 2).relu()
        return torch.stack([self.b[i](y[:, :, i]) for i in range(self.h)], 2)


class CarriedDependency(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = convs(4, 3, 3)

    def forward(self, x):
        prev, outs = 0, []
        for h, conv in enumerate(self.convs):
            prev = conv(x[:, :, h] + prev)
            outs.append(prev)
        return torch.stack(outs, 2)


class SourceReassigned(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = convs(4, 3, 3)

    def forward(self, x):
        outs = []
        for h, conv in enumerate(self.convs):
            outs.append(conv(x[:, :, h]))
            x = x * 2
        return torch.stack(outs, 2)


class SoftmaxRows(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = convs(4, 3, 3)

    def forward(self, x):
        return torch.stack([c(x[:, :, h]).softmax(-1) for h, c in enumerate(self.convs)], 2)


class SharedBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(3, 3, 3, padding=1), nn.BatchNorm1d(3)

    def forward(self, x):
        return torch.stack([self.bn(self.conv(x[:, :, h])) for h in range(4)], 2)


class PadBetweenSites(nn.Module):
    """Site 1's result is padded on its row dim before site 2 reads rows from it: the pad
    must stay where it is, not be moved across the permutes between the sites."""

    def __init__(self, h=4, c=6):
        super().__init__()
        self.a, self.b, self.h = convs(h, c, c), convs(h + 3, c, c), h

    def forward(self, x):
        y = torch.stack([self.a[i](x[..., i]) for i in range(self.h)], -1)
        y = F.pad(y, (2, 1), value=0.5)
        return torch.stack([self.b[i](y[..., i]) for i in range(self.h + 3)], -1)


class ShapeBoundTower(nn.Module):
    """A Conv1d → BatchNorm1d → ReLU → Conv1d tower per row, loop bound from the input's
    shape, written into a buffer: only torch.export can trace it (``aten.batch_norm``)."""

    def __init__(self, h=3):
        super().__init__()
        self.rows = nn.ModuleList(nn.Sequential(
            nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 2, 3))
            for _ in range(h))
        with torch.no_grad():
            for row in self.rows:
                row[1].running_mean.uniform_(-1, 1)
                row[1].running_var.uniform_(0.5, 2)
                row[1].num_batches_tracked.fill_(7)

    def forward(self, x):
        out = x.new_zeros(x.shape[0], 2, x.shape[2], x.shape[3] - 2)
        for h in range(x.shape[2]):
            out[:, :, h] = self.rows[h](x[:, :, h])
        return out


class RowBlock(nn.Module):
    def __init__(self, c=4, h=3):
        super().__init__()
        self.h = h
        self.rows = nn.ModuleList(nn.Sequential(nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c),
                                                nn.ReLU()) for _ in range(h))

    def forward(self, x):
        return torch.stack([self.rows[i](x[:, :, i]) for i in range(self.h)], 2)


class AppliedTwice(nn.Module):
    """One loop module applied twice: both loops fuse into the same fused modules."""

    def __init__(self):
        super().__init__()
        self.block = RowBlock()

    def forward(self, x):
        return self.block(self.block(x) + 1.0)


class Summed(nn.Module):
    def __init__(self, how="stack-sum"):
        super().__init__()
        self.how = how
        self.convs = convs(4, 3, 6)

    def forward(self, x):
        outs = [c(x[:, :, h]) for h, c in enumerate(self.convs)]
        if self.how == "builtin-sum":
            return sum(outs)
        if self.how == "stack-mean":
            return torch.stack(outs, -1).mean(-1)
        return torch.stack(outs, 0).sum(0)
