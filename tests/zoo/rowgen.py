"""Generated per-row models: a chain of ordinary ops per row, read and joined in the
ways people write loops. Used by the property tests of the structural fusion.

A row is a small custom module (traced through, as user code is) built from a pool of
ops; every row of a model runs the same chain with its own parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

D = 8        # features per row (vec and tok rows)
C = 4        # channels per row (seq and img rows)
L = 12       # length (seq rows), tokens (tok rows)
IMG = 6      # height and width (img rows)
VOCAB = 10   # embedding rows


class RMSNorm(nn.Module):
    """Written by hand, as in many LLM codebases."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    """Single-head attention inside a row: (B, T, d) -> (B, T, d)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return w @ v


class Gate(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x))


class ResidualMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class GLU(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 2 * d)

    def forward(self, x):
        return F.glu(self.fc(x), dim=-1)


class ScaleShift(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(d) + 0.5)
        self.shift = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return x * self.scale + self.shift


class InplaceRelu(nn.Module):
    def forward(self, x):
        y = x * 1.0
        y.relu_()
        return y


class Fn(nn.Module):
    """A function as a module step (for the pool's functional ops)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _vec_pool():
    """Ops on (B, D) rows."""
    return {
        "linear": lambda: nn.Linear(D, D),
        "linear_nobias": lambda: nn.Linear(D, D, bias=False),
        "glu": lambda: GLU(D),
        "relu": lambda: nn.ReLU(),
        "relu_inplace": lambda: nn.ReLU(inplace=True),
        "relu_": lambda: InplaceRelu(),
        "gelu": lambda: nn.GELU(),
        "silu": lambda: nn.SiLU(),
        "tanh": lambda: nn.Tanh(),
        "elu": lambda: nn.ELU(),
        "leaky_relu": lambda: nn.LeakyReLU(0.1),
        "hardswish": lambda: nn.Hardswish(),
        "gate": lambda: Gate(D),
        "layernorm": lambda: nn.LayerNorm(D),
        "rmsnorm": lambda: RMSNorm(D),
        "softmax": lambda: Fn(lambda x: torch.softmax(x, -1)),
        "log_softmax": lambda: Fn(lambda x: F.log_softmax(x, dim=-1)),
        "normalize": lambda: Fn(lambda x: F.normalize(x, dim=-1)),
        "clamp": lambda: Fn(lambda x: x.clamp(-1.0, 1.0)),
        "where": lambda: Fn(lambda x: torch.where(x > 0, x, 0.1 * x)),
        "residual_mlp": lambda: ResidualMLP(D),
        "batchnorm1d": lambda: nn.BatchNorm1d(D),
        "scale_shift": lambda: ScaleShift(D),
        "dropout": lambda: nn.Dropout(0.0),
        "sequential": lambda: nn.Sequential(nn.Linear(D, D), nn.ReLU()),
    }


def _seq_pool():
    """Ops on (B, C, L) rows."""
    return {
        "conv1d": lambda: nn.Conv1d(C, C, 3, padding=1),
        "conv1d_depthwise": lambda: nn.Conv1d(C, C, 3, padding=1, groups=C),
        "conv1d_same": lambda: nn.Conv1d(C, C, 5, padding="same", bias=False),
        "batchnorm1d": lambda: nn.BatchNorm1d(C),
        "groupnorm": lambda: nn.GroupNorm(2, C),
        "maxpool1d": lambda: nn.MaxPool1d(3, 1, 1),
        "avgpool1d": lambda: nn.AvgPool1d(3, 1, 1),
        "relu": lambda: nn.ReLU(inplace=True),
    }


def _img_pool():
    """Ops on (B, C, IMG, IMG) rows."""
    return {
        "conv2d": lambda: nn.Conv2d(C, C, 3, padding=1),
        "batchnorm2d": lambda: nn.BatchNorm2d(C),
        "maxpool2d": lambda: nn.MaxPool2d(3, 1, 1),
        "relu": lambda: nn.ReLU(),
    }


def _tok_pool():
    """Ops on (B, L, D) rows."""
    return {"attention": lambda: Attention(D), "layernorm": lambda: nn.LayerNorm(D),
            "linear": lambda: nn.Linear(D, D), "silu": lambda: nn.SiLU()}


POOLS = {"vec": _vec_pool(), "seq": _seq_pool(), "img": _img_pool(), "tok": _tok_pool(),
         "idx": _vec_pool()}


class Row(nn.Module):
    """One row: an embedding first for ``idx`` rows (``size`` rows in its table when
    given), then the chain; with ``size`` on other rows, a last ``Linear(D, size)``."""

    def __init__(self, family: str, chain: list[str], size: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(size or VOCAB, D) if family == "idx" else None
        self.steps = nn.ModuleList(POOLS[family][name]() for name in chain)
        if size is not None and family != "idx":
            self.steps.append(nn.Linear(D, size))

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        for step in self.steps:
            x = step(x)
        return x


# ------------------------------------------------------------------- reads and joins

def row_shape(family: str) -> tuple[int, ...]:
    return {"vec": (D,), "idx": (), "seq": (C, L), "img": (C, IMG, IMG), "tok": (L, D)}[family]


READS = ("index", "unbind", "select", "narrow_blocks", "split", "chunk")
JOINS = ("cat", "stack", "sum", "buffer", "dict", "stack_mean", "list")
SIZED_FAMILIES = ("vec", "tok", "idx")     # ``sizes``: table rows (idx) or head widths
WIDTH_JOINS = ("cat", "dict", "list")      # joins of rows whose widths differ


class RowModel(nn.Module):
    """``n`` rows of ``chain`` reading ``x`` by ``read`` and joined by ``join``; with
    ``sizes`` (one per row), rows that differ in one size (see :class:`Row`)."""

    def __init__(self, family: str, chain: list[str], n: int, read: str, join: str,
                 sizes: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.family, self.n, self.read, self.join, self.sizes = family, n, read, join, sizes
        self.rows = nn.ModuleList(Row(family, chain, sizes[i] if sizes else None)
                                  for i in range(n))

    def extra_repr(self) -> str:
        return (f"family={self.family}, rows={self.n}, read={self.read}, join={self.join}, "
                f"sizes={self.sizes}")

    def example(self, batch: int = 5) -> torch.Tensor:
        if self.family == "idx":
            if self.sizes:
                return torch.stack([torch.randint(0, k, (batch,)) for k in self.sizes], 1)
            return torch.randint(0, VOCAB, (batch, self.n))
        shape = row_shape(self.family)
        if self.read in ("narrow_blocks", "split", "chunk"):
            return torch.randn(batch, self.n * shape[0], *shape[1:])
        return torch.randn(batch, self.n, *shape)

    def _parts(self, x):
        if self.read == "unbind":
            return list(x.unbind(1))
        if self.read == "select":
            return [x.select(1, i) for i in range(self.n)]
        if self.read in ("narrow_blocks", "split", "chunk") and self.family != "idx":
            w = x.shape[1] // self.n
            if self.read == "split":
                return list(torch.split(x, w, dim=1))
            if self.read == "chunk":
                return list(x.chunk(self.n, dim=1))
            return [x[:, i * w:(i + 1) * w] for i in range(self.n)]
        return [x[:, i] for i in range(self.n)]

    def forward(self, x):
        parts = self._parts(x)
        outs = [self.rows[i](parts[i]) for i in range(self.n)]
        if self.join == "cat":
            return torch.cat(outs, dim=-1)
        if self.join == "stack":
            return torch.stack(outs, dim=1)
        if self.join == "sum":
            return sum(outs)
        if self.join == "stack_mean":
            return torch.stack(outs, 0).mean(0)
        if self.join == "dict":
            return {f"row{i}": o for i, o in enumerate(outs)}
        if self.join == "list":
            return outs
        out = outs[0].new_zeros(outs[0].shape[0], self.n, *outs[0].shape[1:])
        for i in range(self.n):
            out[:, i] = outs[i]
        return out
