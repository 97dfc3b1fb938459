"""Models the benchmarks compare: the per-row loop and hand-written equivalents of it.

``RowConvLoop`` is the pattern fxfuse rewrites: H ``Conv1d`` layers, one per row of a
(B, C, H, W) input. ``HandGrouped`` is the known manual answer (one grouped conv),
``VmapRows`` runs the same per-row convs through ``torch.vmap``. Both are built from a
``RowConvLoop``'s weights so that all three compute the same numbers.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from fxfuse.check.verify import permitted_error


class RowConvLoop(nn.Module):
    """H independent ``Conv1d(C, C_out, k)``, one per row of a (B, C, H, W) input.

    Args:
        C: input channels of each row's conv.
        H: number of rows (and convs).
        C_out: output channels of each row's conv.
        k: kernel size; padding is ``k // 2``.
    """

    def __init__(self, C: int, H: int, C_out: int, k: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Conv1d(C, C_out, k, padding=k // 2) for _ in range(H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C_out, H, W')."""
        H = len(self.layers)
        return torch.cat([self.layers[h](x[:, :, h, :]).unsqueeze(2) for h in range(H)], dim=2)


class ChainedRowConvLoops(nn.Module):
    """``N`` ``RowConvLoop`` sites applied one after another (``C_out == C``, odd ``k``).

    Args:
        N: number of loop sites.
        C: channels of every row conv.
        H: rows per site.
        k: kernel size (odd, so each site keeps the length).
    """

    def __init__(self, N: int, C: int, H: int, k: int = 3) -> None:
        super().__init__()
        self.sites = nn.ModuleList(RowConvLoop(C, H, C, k) for _ in range(N))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        for site in self.sites:
            x = site(x)
        return x


class HandGrouped(nn.Module):
    """One grouped ``Conv1d`` computing the same as a given ``RowConvLoop``.

    ``x.transpose(1, 2).reshape(B, H*C, W)`` -> ``Conv1d(H*C, H*C_out, k, groups=H)``
    (row weights concatenated on dim 0) -> ``view(B, H, C_out, W').transpose(1, 2)``.

    Args:
        loop: the loop model whose weights are copied.
    """

    def __init__(self, loop: RowConvLoop, contiguous: bool = False) -> None:
        super().__init__()
        self.contiguous = contiguous          # the loop's output is contiguous; a view is not
        first = loop.layers[0]
        H = len(loop.layers)
        self.rows, self.c_out = H, first.out_channels
        self.conv = nn.Conv1d(H * first.in_channels, H * first.out_channels, first.kernel_size[0],
                              padding=first.padding[0], groups=H, bias=first.bias is not None)
        self.conv.to(device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat([layer.weight for layer in loop.layers], 0))
            if first.bias is not None:
                self.conv.bias.copy_(torch.cat([layer.bias for layer in loop.layers], 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C_out, H, W')."""
        B, C, H, W = x.shape
        y = self.conv(x.transpose(1, 2).reshape(B, H * C, W))
        y = y.view(B, H, self.c_out, y.shape[-1]).transpose(1, 2)
        return y.contiguous() if self.contiguous else y


class VmapRows(nn.Module):
    """The loop's per-row convs run as one ``torch.vmap`` over stacked parameters.

    Args:
        loop: the loop model whose weights are stacked (``stack_module_state``).
    """

    def __init__(self, loop: RowConvLoop) -> None:
        super().__init__()
        params, buffers = stack_module_state(list(loop.layers))
        self.names = sorted(params)
        self.buffer_names = sorted(buffers)
        for name in self.names:
            self.register_buffer("p_" + name, params[name].detach().clone())
        for name in self.buffer_names:
            self.register_buffer("b_" + name, buffers[name].detach().clone())
        self.base = [copy.deepcopy(loop.layers[0]).to("meta")]  # a list: not a submodule

    def _row(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
             row: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base[0], (params, buffers), (row,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C_out, H, W')."""
        params = {n: getattr(self, "p_" + n) for n in self.names}
        buffers = {n: getattr(self, "b_" + n) for n in self.buffer_names}
        return torch.vmap(self._row, in_dims=(0, 0, 2), out_dims=2)(params, buffers, x)


def self_check(device: str = "cpu") -> None:
    """Assert that ``HandGrouped`` and ``VmapRows`` match ``RowConvLoop`` on a few shapes."""
    torch.manual_seed(0)
    for B, C, H, W, k, C_out in [(32, 15, 10, 100, 3, 15), (3, 4, 7, 9, 4, 6), (2, 1, 1, 1, 1, 3)]:
        loop = RowConvLoop(C, H, C_out, k).to(device)
        x = torch.randn(B, C, H, W, device=device)
        atol = permitted_error(loop, (x,))      # TF32 on CUDA: what the mode permits the loop
        with torch.inference_mode():
            want = loop(x)
            for other in (HandGrouped(loop), VmapRows(loop)):
                torch.testing.assert_close(other(x), want, rtol=0, atol=atol,
                                           msg=lambda m: f"{type(other).__name__}: {m}")


if __name__ == "__main__":
    self_check()
    print("models: HandGrouped and VmapRows match RowConvLoop")
