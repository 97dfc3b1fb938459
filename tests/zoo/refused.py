"""Loops the pass must leave alone, each for one reason.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import RowLoop
from .spellings import Seed


class KernelSizes(RowLoop):
    """Every row's conv has its own kernel size (padding keeps the length), padded
    circularly: a kernel zero-padded to the largest would not compute a row."""

    def __init__(self, kernels: tuple[int, ...] = (1, 3, 5, 7)) -> None:
        super().__init__(H=len(kernels), padding=1)
        self.layers = nn.ModuleList(nn.Conv1d(self.C, self.C_out, k, padding=k // 2,
                                              padding_mode="circular") for k in kernels)

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


class PartlyFrozen(Seed):
    """Row 0's conv is frozen (``requires_grad=False``), the others train."""

    def __init__(self) -> None:
        super().__init__()
        self.layers[0].requires_grad_(False)


class WeightNormed(Seed):
    """Row 1's conv carries a weight-norm parametrization."""

    def __init__(self) -> None:
        super().__init__()
        nn.utils.parametrizations.weight_norm(self.layers[1])


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
