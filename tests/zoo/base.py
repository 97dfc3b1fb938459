"""The base of the conv loop zoo: ``RowLoop`` (H convs over rows of a (B, C, H, W) input).
"""
from __future__ import annotations

import torch
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
