"""The same per-row Conv1d loop spelled the many ways real code spells it.

Every model takes a batch-first input; ``in_shape`` is its shape without the batch.
Unless a class says otherwise, the source is (B, C, H, W) and the result is what the
seed spelling gives, (B, C_out, H, W').
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import RowLoop


class Seed(RowLoop):
    """The seed post: append ``layers[h](x[:, :, h, :]).unsqueeze(2)``, cat on dim 2."""

    def forward(self, x):
        outs = []
        for h in range(self.H):
            outs.append(self.layers[h](x[:, :, h, :]).unsqueeze(2))
        return torch.cat(outs, 2)


class Stack(RowLoop):
    """``torch.stack(rows, dim=d)``."""

    def __init__(self, dim: int = 2, **kw) -> None:
        super().__init__(**kw)
        self.dim = dim

    def forward(self, x):
        return torch.stack([self.layers[h](x[:, :, h]) for h in range(self.H)], dim=self.dim)


class CatNoUnsqueeze(RowLoop):
    """``torch.cat(rows, dim=d)`` of (N, C', L) rows: channels (d=1) or length (d=-1)."""

    def __init__(self, dim: int = 1, **kw) -> None:
        super().__init__(**kw)
        self.dim = dim

    def forward(self, x):
        return torch.cat([self.layers[h](x[:, :, h]) for h in range(self.H)], dim=self.dim)


class SelectDim(RowLoop):
    """Rows on any dim of the source: ``x.select(dim, h)``, then channels first."""

    def __init__(self, layout: str = "BCHW", dim: int = 2, **kw) -> None:
        super().__init__(**kw)
        self.layout, self.dim = layout, dim
        rest = [d for d in layout if d != "H"]
        self.swap = rest.index("W") < rest.index("C")

    def forward(self, x):
        outs = []
        for h in range(self.H):
            row = x.select(self.dim, h)
            if self.swap:
                row = row.transpose(1, 2)
            outs.append(self.layers[h](row))
        return torch.stack(outs, 2)


class Getitem(RowLoop):
    """``x[:, :, h]``."""

    def forward(self, x):
        return torch.stack([self.layers[h](x[:, :, h]) for h in range(self.H)], 2)


class GetitemEllipsis(RowLoop):
    """``x[..., h, :]``."""

    def forward(self, x):
        return torch.stack([self.layers[h](x[..., h, :]) for h in range(self.H)], -2)


class GetitemNegative(RowLoop):
    """``x[:, :, h - H]`` (negative row indices), rows on dim -2."""

    def forward(self, x):
        return torch.stack([self.layers[h](x[:, :, h - self.H]) for h in range(self.H)], -2)


class Unbind(RowLoop):
    """``x.unbind(2)``."""

    def forward(self, x):
        rows = x.unbind(2)
        return torch.stack([self.layers[h](rows[h]) for h in range(self.H)], 2)


class SplitSqueeze(RowLoop):
    """``x.split(1, dim=2)`` + ``squeeze(2)``."""

    def forward(self, x):
        parts = x.split(1, dim=2)
        return torch.stack([self.layers[h](parts[h].squeeze(2)) for h in range(self.H)], 2)


class ChunkSqueeze(RowLoop):
    """``x.chunk(H, 2)`` + ``squeeze(2)``."""

    def forward(self, x):
        parts = x.chunk(self.H, 2)
        return torch.cat([self.layers[h](parts[h].squeeze(2)).unsqueeze(2)
                          for h in range(self.H)], 2)


class Narrow(RowLoop):
    """``x.narrow(2, h, 1).squeeze(2)``."""

    def forward(self, x):
        return torch.stack([self.layers[h](x.narrow(2, h, 1).squeeze(2))
                            for h in range(self.H)], 2)


class KeepDimSlice(RowLoop):
    """``x[:, :, h:h+1].squeeze(2)``, joined with ``unsqueeze`` + ``cat``."""

    def forward(self, x):
        return torch.cat([self.layers[h](x[:, :, h:h + 1].squeeze(2)).unsqueeze(2)
                          for h in range(self.H)], dim=2)


class Reversed(RowLoop):
    """Rows joined in reverse order (a gather on the row dim)."""

    def forward(self, x):
        return torch.stack([self.layers[h](x[:, :, self.H - 1 - h]) for h in range(self.H)], 2)


class ChannelOneRows(RowLoop):
    """A (B, H, L) source; each row ``x[:, h].unsqueeze(1)`` is a 1-channel signal."""

    layout = "BHW"

    def __init__(self, **kw) -> None:
        super().__init__(C=1, **kw)

    def forward(self, x):
        return torch.cat([self.layers[h](x[:, h].unsqueeze(1)).unsqueeze(1)
                          for h in range(self.H)], 1)


class ChannelOneSlices(ChannelOneRows):
    """A (B, H, L) source; each row ``x[:, h:h+1]``, joined on channels."""

    def forward(self, x):
        return torch.cat([self.layers[h](x[:, h:h + 1]) for h in range(self.H)], 1)


class ChannelChunks(RowLoop):
    """A hand-written grouped conv: ``x.chunk(G, 1)`` of (B, G*C, L), one conv per chunk,
    ``cat(dim=1)``."""

    layout = "BGW"

    @property
    def in_shape(self):
        return (self.H * self.C, self.W)

    def forward(self, x):
        parts = x.chunk(self.H, dim=1)
        return torch.cat([self.layers[g](parts[g]) for g in range(self.H)], dim=1)


class ModuleDictRows(RowLoop):
    """Convs in a ``ModuleDict``, iterated with ``enumerate(items())``."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.rows = nn.ModuleDict({f"row{h}": conv for h, conv in enumerate(self.layers)})
        del self.layers

    def forward(self, x):
        outs = []
        for h, (_, conv) in enumerate(self.rows.items()):
            outs.append(conv(x[:, :, h]))
        return torch.stack(outs, 2)


class Attributes(RowLoop):
    """Separate attributes ``self.conv_a``, ``self.conv_b``, ``self.conv_c``."""

    def __init__(self, **kw) -> None:
        super().__init__(H=3, **kw)
        self.conv_a, self.conv_b, self.conv_c = self.layers
        del self.layers

    def forward(self, x):
        a = self.conv_a(x[:, :, 0])
        b = self.conv_b(x[:, :, 1])
        c = self.conv_c(x[:, :, 2])
        return torch.stack([a, b, c], dim=2)


class Block(nn.Module):
    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.conv = conv


class NestedBlocks(RowLoop):
    """``self.blocks[i].conv``."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.blocks = nn.ModuleList(Block(c) for c in self.layers)
        del self.layers

    def forward(self, x):
        return torch.stack([self.blocks[i].conv(x[:, :, i]) for i in range(self.H)], 2)


class Enumerate(RowLoop):
    """``for h, conv in enumerate(self.layers)``."""

    def forward(self, x):
        outs = []
        for h, conv in enumerate(self.layers):
            outs.append(conv(x[:, :, h]))
        return torch.stack(outs, 2)


class ZipUnbind(RowLoop):
    """``for conv, row in zip(self.layers, x.unbind(2))`` (iterating a traced tensor)."""

    def forward(self, x):
        return torch.stack([conv(row) for conv, row in zip(self.layers, x.unbind(2))], 2)


class ZipRange(RowLoop):
    """``for h, conv in zip(range(H), self.layers)``."""

    def forward(self, x):
        outs = []
        for h, conv in zip(range(self.H), self.layers):
            outs.append(conv(x[:, :, h]))
        return torch.stack(outs, 2)


class Functional(RowLoop):
    """``F.conv1d(x_h, self.w[h], self.b[h], ...)`` with ``ParameterList`` weights."""

    def __init__(self, bias: bool = True, **kw) -> None:
        super().__init__(bias=bias, **kw)
        self.w = nn.ParameterList(c.weight for c in self.layers)
        self.b = nn.ParameterList(c.bias for c in self.layers) if bias else None
        self.conv_kw = {k: v for k, v in kw.items() if k in ("stride", "padding", "dilation",
                                                             "groups")}
        del self.layers

    def forward(self, x):
        outs = []
        for h in range(self.H):
            bias = self.b[h] if self.b is not None else None
            outs.append(F.conv1d(x[:, :, h], self.w[h], bias, **self.conv_kw))
        return torch.stack(outs, 2)


class BufferWrite(RowLoop):
    """``out = x.new_zeros(...)``; ``out[:, :, h] = layers[h](x[:, :, h])`` with the loop
    bound read from ``x.shape[2]`` (needs the export tracer)."""

    def forward(self, x):
        out = x.new_zeros(x.shape[0], self.C_out, x.shape[2], self.W_out)
        for h in range(x.shape[2]):
            out[:, :, h] = self.layers[h](x[:, :, h])
        return out


class ShapeBound(RowLoop):
    """The seed spelling with the loop bound read from ``x.shape[2]``."""

    def forward(self, x):
        return torch.cat([self.layers[h](x[:, :, h, :]).unsqueeze(2)
                          for h in range(x.shape[2])], 2)


class Frozen(Seed):
    """Every row's conv is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.layers.requires_grad_(False)


class FunctionForms(RowLoop):
    """``torch.select`` / ``torch.unbind(dim=)`` / ``torch.narrow`` as functions, joined by
    ``torch.concatenate(..., axis=)`` or ``torch.cat(tensors=..., dim=)``."""

    def __init__(self, form: str = "select", **kw) -> None:
        super().__init__(**kw)
        self.form = form

    def forward(self, x):
        if self.form == "select":
            rows = [torch.select(x, 2, h) for h in range(self.H)]
        elif self.form == "unbind":
            parts = torch.unbind(x, dim=2)
            rows = [parts[h] for h in range(self.H)]
        else:
            rows = [torch.narrow(x, 2, h, 1).squeeze(dim=2) for h in range(self.H)]
        outs = [self.layers[h](rows[h]).unsqueeze(-2) for h in range(self.H)]
        if self.form == "unbind":
            return torch.cat(tensors=outs, dim=-2)
        return torch.concatenate(outs, axis=2)


class TensorSplitRows(RowLoop):
    """``x.tensor_split(H, dim=2)`` + ``squeeze(2)``, joined by ``torch.concat``."""

    def forward(self, x):
        parts = x.tensor_split(self.H, dim=2)
        return torch.concat([self.layers[h](parts[h].squeeze(2)).unsqueeze(2)
                             for h in range(self.H)], 2)


class TransposedRows(RowLoop):
    """A (B, W, H, C) source: ``x[:, :, h].transpose(1, 2)`` per row, ``movedim`` after."""

    layout = "BWHC"

    def forward(self, x):
        y = torch.stack([self.layers[h](x[:, :, h].transpose(1, 2)) for h in range(self.H)], 1)
        return y.movedim(1, 2)


class EscapingRow(RowLoop):
    """``return torch.stack(outs, 1), outs[0]``: a per-row output returned as it is."""

    def forward(self, x):
        outs = [self.layers[h](x[:, :, h]) for h in range(self.H)]
        return torch.stack(outs, 1), outs[0]
