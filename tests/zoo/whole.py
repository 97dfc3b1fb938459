"""Whole models: several sites, sites feeding sites, rows also used outside the loop,
rows sharing one module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import RowLoop, make_convs
from .spellings import Stack


class TwoSites(nn.Module):
    """Two independent loops over the same input: rows on dim 2 and rows on dim 3."""

    in_shape = (3, 4, 6)

    def __init__(self) -> None:
        super().__init__()
        self.by_h = make_convs(4, 3, 2, 3, padding=1)
        self.by_w = make_convs(6, 3, 2, 3, padding=1)

    def forward(self, x):
        a = torch.stack([self.by_h[h](x[:, :, h]) for h in range(4)], 2)        # (B, 2, 4, 6)
        b = torch.stack([self.by_w[w](x[:, :, :, w]) for w in range(6)], 3)     # (B, 2, 4, 6)
        return a * b


class Chained(nn.Module):
    """Site 2 reads site 1's output."""

    in_shape = (3, 4, 8)

    def __init__(self) -> None:
        super().__init__()
        self.first = make_convs(4, 3, 3, 3, padding=1)
        self.second = make_convs(4, 3, 2, 3)

    def forward(self, x):
        y = torch.stack([self.first[h](x[:, :, h]) for h in range(4)], 2)
        return torch.stack([self.second[h](y[:, :, h]) for h in range(4)], 2)


class PosterNet(nn.Module):
    """The seed poster's model: a joint ``Conv2d(C, C, (1, k))`` plus the per-row loop,
    summed, then a ``Linear`` head."""

    in_shape = (4, 5, 16)

    def __init__(self, C: int = 4, H: int = 5, W: int = 16, k: int = 3, classes: int = 3):
        super().__init__()
        self.H = H
        self.joint = nn.Conv2d(C, C, (1, k), padding=(0, k // 2))
        self.rows = make_convs(H, C, C, k, padding=k // 2)
        self.head = nn.Linear(C * H * W, classes)

    def forward(self, x):
        rows = torch.cat([self.rows[h](x[:, :, h, :]).unsqueeze(2) for h in range(self.H)], 2)
        y = torch.relu(self.joint(x) + rows)
        return self.head(y.flatten(1))


class RowExport(RowLoop):
    """A per-row conv output is also used outside the loop (returned on its own)."""

    def forward(self, x):
        rows = [self.layers[h](x[:, :, h]) for h in range(self.H)]
        return torch.stack(rows, 2), rows[1].sigmoid()


class Shared(RowLoop):
    """Every row calls the same conv."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.conv = self.layers[0]
        del self.layers

    def forward(self, x):
        return torch.stack([self.conv(x[:, :, h]) for h in range(self.H)], 2)


class SiteOnRowExport(nn.Module):
    """Site 2 splits the channels of one of site 1's per-row outputs (a row export)."""

    in_shape = (3, 4, 8)

    def __init__(self) -> None:
        super().__init__()
        self.rows = make_convs(4, 3, 6, 3)
        self.parts = make_convs(3, 2, 2, 3)

    def forward(self, x):
        ys = [self.rows[h](x[:, :, h]) for h in range(4)]
        parts = ys[0].chunk(3, 1)
        return torch.stack(ys, 2), torch.cat([self.parts[g](parts[g]) for g in range(3)], 1)


class CatOfSites(nn.Module):
    """Two loops whose results are joined by one more ``cat`` (not a loop itself)."""

    in_shape = (3, 4, 8)

    def __init__(self) -> None:
        super().__init__()
        self.a = make_convs(4, 3, 2, 3, padding=1)
        self.b = make_convs(4, 3, 2, 3, padding=1)

    def forward(self, x):
        a = torch.stack([self.a[h](x[:, :, h]) for h in range(4)], 2)
        b = torch.stack([self.b[h](x[:, :, h]) for h in range(4)], 2)
        return torch.cat([a, b, x], 1)


class DenseSkip(nn.Module):
    """``cat([x, relu(conv(x))])``: one conv and a skip, no loop at all."""

    in_shape = (3, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 3, padding=1)

    def forward(self, x):
        return torch.cat([x, torch.relu(self.conv(x))], 1)


class StridedRows(RowLoop):
    """Every other row of an (B, C, 2H, W) source, ``x[:, :, 2 * h]``."""

    @property
    def in_shape(self):
        return (self.C, 2 * self.H, self.W)

    def forward(self, x):
        return torch.stack([self.layers[h](x[:, :, 2 * h]) for h in range(self.H)], 2)


class BufferCopy(RowLoop):
    """``out = torch.empty(...)``; ``out.select(2, h).copy_(layers[h](x[:, :, h]))``."""

    def forward(self, x):
        out = torch.empty(x.shape[0], self.C_out, self.H, self.W_out)
        for h in range(self.H):
            out.select(2, h).copy_(self.layers[h](x[:, :, h]))
        return out


class PermutedSource(RowLoop):
    """Rows read from a permuted, computed tensor: ``(2 * x).permute(0, 2, 1, 3)[:, h]``."""

    def forward(self, x):
        y = (2 * x).permute(0, 2, 1, 3)
        return torch.stack([self.layers[h](y[:, h]) for h in range(self.H)], 1)


class TwoInputs(RowLoop):
    """Rows of ``x``, plus a second input added after the loop."""

    def forward(self, x, bias):
        return torch.stack([self.layers[h](x[:, :, h]) for h in range(self.H)], 2) + bias


class SharedFunctional(RowLoop):
    """Every row calls ``F.conv1d`` with the same weight."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.weight, self.bias = self.layers[0].weight, self.layers[0].bias
        del self.layers

    def forward(self, x):
        return torch.stack([F.conv1d(x[:, :, h], self.weight, self.bias)
                            for h in range(self.H)], 2)


class CalledTwice(nn.Module):
    """One loop module applied twice: each site's weights are used by the other."""

    in_shape = (3, 4, 8)

    def __init__(self) -> None:
        super().__init__()
        self.loop = Stack(C=3, C_out=3, padding=1)

    def forward(self, x):
        return self.loop(self.loop(x))


class SharedUsedOutside(Shared):
    """Every row calls the same conv, which is also called outside the loop."""

    def forward(self, x):
        rows = torch.stack([self.conv(x[:, :, h]) for h in range(self.H)], 2)
        return rows, self.conv(x.mean(2))
