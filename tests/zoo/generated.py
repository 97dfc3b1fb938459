"""Loops put together from parts, for the property tests.
"""
from __future__ import annotations

import torch

from .base import RowLoop


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
