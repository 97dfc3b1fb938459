"""The loop zoo: the same per-row Conv1d loop spelled the many ways real code spells it.

Every model takes a batch-first input; ``in_shape`` is its shape without the batch.
Unless a class says otherwise, the source is (B, C, H, W) and the result is what the
seed spelling gives, (B, C_out, H, W').
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_convs(n: int, C: int, C_out: int, k: int, **conv) -> nn.ModuleList:
    return nn.ModuleList(nn.Conv1d(C, C_out, k, **conv) for _ in range(n))


class RowLoop(nn.Module):
    """Base: ``H`` convs in ``self.layers``, one per row of a (B, C, H, W) input."""

    layout = "BCHW"

    def __init__(self, H: int = 4, C: int = 3, C_out: int = 5, k: int = 3, W: int = 8,
                 **conv) -> None:
        super().__init__()
        self.H, self.C, self.C_out, self.W = H, C, C_out, W
        self.layers = make_convs(H, C, C_out, k, **conv)
        with torch.no_grad():
            self.W_out = self.layers[0](torch.zeros(1, C, W)).shape[-1]

    @property
    def in_shape(self) -> tuple[int, ...]:
        sizes = {"C": self.C, "H": self.H, "W": self.W}
        return tuple(sizes[d] for d in self.layout[1:])

    def example(self, batch: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(batch, *self.in_shape).to(dtype)


# ------------------------------------------------------------------ the seed and friends

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


# ------------------------------------------------------------------ containers and loops

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


# ------------------------------------------------------------------ whole models

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


# ------------------------------------------------------------------ loops to leave alone

class KernelSizes(RowLoop):
    """Every row's conv has its own kernel size (padding keeps the length)."""

    def __init__(self, kernels: tuple[int, ...] = (1, 3, 5, 7)) -> None:
        super().__init__(H=len(kernels), padding=1)
        self.layers = nn.ModuleList(nn.Conv1d(self.C, self.C_out, k, padding=k // 2)
                                    for k in kernels)

    def forward(self, x):
        return torch.stack([self.layers[h](x[:, :, h]) for h in range(self.H)], 2)


class OutChannels(RowLoop):
    """Row 1's conv has more output channels; joined on channels."""

    def __init__(self) -> None:
        super().__init__()
        self.layers[1] = nn.Conv1d(self.C, self.C_out + 2, 3)

    def forward(self, x):
        return torch.cat([self.layers[h](x[:, :, h]) for h in range(self.H)], 1)


class PartlyShared(RowLoop):
    """Rows 0 and 1 call the same conv, rows 2 and 3 their own."""

    def forward(self, x):
        convs = [self.layers[0], self.layers[0], self.layers[2], self.layers[3]]
        return torch.stack([convs[h](x[:, :, h]) for h in range(self.H)], 2)


class RowAlsoReturned(RowLoop):
    """An unsqueezed row is also returned: a per-row intermediate with an outside user."""

    def forward(self, x):
        rows = [self.layers[h](x[:, :, h]).unsqueeze(2) for h in range(self.H)]
        return torch.cat(rows, 2), rows[0]


class Recurrent(RowLoop):
    """Row h reads row h-1's output: ``y = conv_h(y + x[:, :, h])``."""

    def __init__(self) -> None:
        super().__init__(C=3, C_out=3, padding=1)

    def forward(self, x):
        y = x[:, :, 0]
        outs = []
        for h in range(self.H):
            y = self.layers[h](y + x[:, :, h]) if h else self.layers[h](y)
            outs.append(y)
        return torch.stack(outs, 2)


class Feedback(RowLoop):
    """Row h reads row h-1's output directly: ``y_h = conv_h(y_{h-1})``."""

    def __init__(self) -> None:
        super().__init__(C=3, C_out=3, padding=1)

    def forward(self, x):
        y = x[:, :, 0]
        outs = []
        for h in range(self.H):
            y = self.layers[h](y)
            outs.append(y)
        return torch.stack(outs, 2)


class BufferFeedback(RowLoop):
    """Row h reads the buffer row h-1 wrote."""

    def __init__(self) -> None:
        super().__init__(C=3, C_out=3, padding=1)

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.C, self.H, self.W)
        out[:, :, 0] = self.layers[0](x[:, :, 0])
        for h in range(1, self.H):
            out[:, :, h] = self.layers[h](out[:, :, h - 1])
        return out


class Hooked(Seed):
    """Row 1's conv has a forward hook."""

    def __init__(self) -> None:
        super().__init__()
        self.layers[1].register_forward_hook(lambda mod, args, out: out * 2)


class ScaledConv1d(nn.Conv1d):
    def forward(self, x):
        return super().forward(x) * 0.5


class CustomForward(Seed):
    """Row 2's conv is a ``Conv1d`` subclass with its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.layers[2] = ScaledConv1d(self.C, self.C_out, 3)


class PerRowOp(RowLoop):
    """A per-row op between each conv and the cat: ``op(conv_h(x_h)).unsqueeze(2)``."""

    def __init__(self, op: str = "relu") -> None:
        super().__init__()
        self.op = op

    def forward(self, x):
        outs = []
        for h in range(self.H):
            y = self.layers[h](x[:, :, h])
            y = torch.relu(y) if self.op == "relu" else torch.cumsum(y, -1) \
                if self.op == "cumsum" else torch.softmax(y, -1)
            outs.append(y.unsqueeze(2))
        return torch.cat(outs, 2)


class CatWithInput(RowLoop):
    """The cat also joins a tensor that is not a conv output (the input row itself)."""

    def __init__(self) -> None:
        super().__init__(padding=1)

    def forward(self, x):
        rows = [self.layers[h](x[:, :, h]) for h in range(self.H)]
        return torch.cat(rows + [x[:, :, 0]], 1)


class TiedOutside(RowLoop):
    """Row 0's weight is tied to another conv used outside the loop."""

    def __init__(self) -> None:
        super().__init__(padding=1)
        self.other = nn.Conv1d(self.C, self.C_out, 3, padding=1)
        self.other.weight = self.layers[0].weight

    def forward(self, x):
        y = torch.stack([self.layers[h](x[:, :, h]) for h in range(self.H)], 2)
        return y, self.other(x[:, :, 0])


class PartialBuffer(RowLoop):
    """Only some rows of the buffer are written; the rest stay zero."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.C_out, self.H + 1, self.W_out)
        for h in range(self.H):
            out[:, :, h] = self.layers[h](x[:, :, h])
        return out


class DtypeChange(RowLoop):
    """Float rows written into a float64 buffer."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.C_out, self.H, self.W_out, dtype=torch.float64)
        for h in range(self.H):
            out[:, :, h] = self.layers[h](x[:, :, h])
        return out


# ------------------------------------------------------------------ generated loops

class Generated(RowLoop):
    """A loop put together from parts, for property tests.

    Args:
        layout: where the rows sit in the source: ``"BCHW"``, ``"BHCW"`` or ``"BCWH"``.
        negative: address the row dim with a negative index.
        read: ``"select"``, ``"unbind"``, ``"split"`` (+ squeeze) or ``"narrow"`` (+ squeeze).
        join: ``("stack", d)``, ``("unsqueeze-cat", d)``, ``("cat", d)`` (no unsqueeze) or
            ``("buffer", d)`` (``out.select(d, h).copy_(row)`` into ``new_zeros``).
        order: the source row each conv reads (default: row h); the source has
            ``max(order) + 1`` rows.
    """

    def __init__(self, layout: str = "BCHW", negative: bool = False, read: str = "select",
                 join: tuple[str, int] = ("stack", 2), order: tuple[int, ...] | None = None,
                 **kw) -> None:
        super().__init__(**kw)
        self.layout, self.read, self.join = layout, read, join
        self.dim = layout.index("H") - (4 if negative else 0)
        self.order = tuple(order) if order is not None else tuple(range(self.H))

    @property
    def in_shape(self):
        sizes = {"C": self.C, "H": max(self.order) + 1, "W": self.W}
        return tuple(sizes[d] for d in self.layout[1:])

    def _rows(self, x):
        d = self.dim
        if self.read == "unbind":
            parts = x.unbind(d)
            return [parts[r] for r in self.order]
        if self.read == "split":
            parts = x.split(1, d)
            return [parts[r].squeeze(d) for r in self.order]
        if self.read == "narrow":
            return [x.narrow(d, r, 1).squeeze(d) for r in self.order]
        return [x.select(d, r) for r in self.order]

    def forward(self, x):
        rows = self._rows(x)
        outs = [self.layers[h](rows[h]) for h in range(self.H)]
        kind, d = self.join
        if kind == "stack":
            return torch.stack(outs, d)
        if kind == "unsqueeze-cat":
            return torch.cat([o.unsqueeze(d) for o in outs], d)
        if kind == "buffer":
            shape = [x.shape[0], self.C_out, self.W_out]
            shape.insert(d, self.H)
            out = x.new_zeros(shape)
            for h in range(self.H):
                out.select(d, h).copy_(outs[h])
            return out
        return torch.cat(outs, d)


class PartlyFrozen(Seed):
    """Row 0's conv is frozen (``requires_grad=False``), the others train."""

    def __init__(self) -> None:
        super().__init__()
        self.layers[0].requires_grad_(False)


class Frozen(Seed):
    """Every row's conv is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.layers.requires_grad_(False)


class WeightNormed(Seed):
    """Row 1's conv carries a weight-norm parametrization."""

    def __init__(self) -> None:
        super().__init__()
        nn.utils.parametrizations.weight_norm(self.layers[1])


class CalledTwice(nn.Module):
    """One loop module applied twice: each site's weights are used by the other."""

    in_shape = (3, 4, 8)

    def __init__(self) -> None:
        super().__init__()
        self.loop = Stack(C=3, C_out=3, padding=1)

    def forward(self, x):
        return self.loop(self.loop(x))


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


class SharedUsedOutside(Shared):
    """Every row calls the same conv, which is also called outside the loop."""

    def forward(self, x):
        rows = torch.stack([self.conv(x[:, :, h]) for h in range(self.H)], 2)
        return rows, self.conv(x.mean(2))


class TiedRows(Seed):
    """``layers[1].weight = layers[0].weight``: two rows share one weight tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.layers[1].weight = self.layers[0].weight


class StorageTiedRows(Seed):
    """``layers[2].weight`` is another Parameter over ``layers[1].weight``'s memory."""

    def __init__(self) -> None:
        super().__init__()
        self.layers[2].weight = nn.Parameter(self.layers[1].weight.detach())


class EscapingRow(RowLoop):
    """``return torch.stack(outs, 1), outs[0]``: a per-row output returned as it is."""

    def forward(self, x):
        outs = [self.layers[h](x[:, :, h]) for h in range(self.H)]
        return torch.stack(outs, 1), outs[0]
