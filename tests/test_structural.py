"""The structural fusion on hand-written models, written the way people write them, and
its refusals. Every positive case checks the forced ``vmap`` lowering (the rows fused,
no per-row layer left, exact at another batch size) and the default path (exact)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse


class DLinear(nn.Module):
    """The ``individual`` flag of DLinear-style forecasters: one Linear per channel,
    written into a preallocated tensor moved with ``.to(x.device)``."""

    def __init__(self, channels: int = 5, seq: int = 24, pred: int = 8, individual=True):
        super().__init__()
        self.channels, self.pred, self.individual = channels, pred, individual
        self.linears = nn.ModuleList(nn.Linear(seq, pred) for _ in range(channels))

    def forward(self, x):                       # (B, seq, channels)
        out = torch.zeros([x.size(0), self.pred, self.channels], dtype=x.dtype).to(x.device)
        for i in range(self.channels):
            out[:, :, i] = self.linears[i](x[:, :, i])
        return out


class Towers(nn.Module):
    """Per-variable towers in a ModuleDict, zipped with the inputs' columns, returned
    as a dict; an optional ``mask=None`` argument."""

    def __init__(self, names=("a", "b", "c", "d"), d: int = 6):
        super().__init__()
        self.names = names
        self.towers = nn.ModuleDict({n: nn.Sequential(nn.Linear(1, d), nn.ReLU(inplace=True),
                                                      nn.Flatten(), nn.Linear(d, d))
                                     for n in names})

    def forward(self, x, mask=None):
        cols = x.split(1, dim=-1)
        out = {n: self.towers[n](c) for n, c in zip(self.names, cols)}
        if mask is not None:
            out = {k: v * mask for k, v in out.items()}
        return out


class Gated(nn.Module):
    """GLU rows with a hand-written RMSNorm and a softmax over each row's features."""

    def __init__(self, n: int = 4, d: int = 8):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(n))
        self.scale = nn.ParameterList(nn.Parameter(torch.rand(d) + 0.5) for _ in range(n))

    def forward(self, x):                       # (B, n, d)
        outs = []
        for i, (fc, w) in enumerate(zip(self.fc, self.scale)):
            h = F.glu(fc(x[:, i]), dim=-1)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w
            outs.append(torch.softmax(h, -1))
        return torch.stack(outs, dim=1)


class EmbeddingColumns(nn.Module):
    """TabTransformer-style: an embedding per categorical column (different
    cardinalities) beside continuous columns passed through, all in one cat."""

    def __init__(self):
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(10, 4) for _ in range(3))

    def forward(self, cat, cont):
        parts = [e(cat[:, i]) for i, e in enumerate(self.embeds)]
        return torch.cat(parts + [cont], dim=1)


CASES = {
    "dlinear-individual-buffer": (DLinear, lambda b: (torch.randn(b, 24, 5),), 5),
    "moduledict-zip-dict-output": (Towers, lambda b: (torch.randn(b, 4),), 4),
    "glu-rmsnorm-softmax": (Gated, lambda b: (torch.randn(b, 4, 8),), 4),
    "embedding-columns-beside-continuous": (
        EmbeddingColumns, lambda b: (torch.randint(0, 10, (b, 3)), torch.randn(b, 2)), 3),
}


def _flat(out):
    return list(out.values()) if isinstance(out, dict) else [out]


@pytest.mark.parametrize("make,inputs,rows", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_real_spellings_vectorise(make, inputs, rows, mode):
    model = make().train(mode == "train")
    example, other = inputs(6), inputs(9)
    result = fxfuse.fuse(model, example, lowering="vmap", benchmark=False)
    fused = [s for s in result.sites if s.fused]
    assert [s.rows for s in fused] == [rows] and fused[0].lowering == "vmap", result.sites
    layers = [n for n in result.model.graph.nodes if n.op == "call_module"
              and isinstance(result.model.get_submodule(str(n.target)), nn.Linear)]
    assert not layers, result.model.code
    with torch.no_grad():
        for got, want in zip(_flat(copy.deepcopy(result.model)(*other)),
                             _flat(copy.deepcopy(model)(*other))):
            torch.testing.assert_close(got, want)
    default = fxfuse.fuse(model, example, benchmark=False, auto_rounds=2)
    with torch.no_grad():
        for got, want in zip(_flat(copy.deepcopy(default.model)(*other)),
                             _flat(copy.deepcopy(model)(*other))):
            torch.testing.assert_close(got, want)


def test_auto_picks_the_vectorised_rows_when_they_are_faster(monkeypatch):
    """The default path: no row-op kind covers GLU + RMSNorm + softmax rows; ``auto``
    times their vectorised form against the loop (a fake clock where it is faster) and
    rewrites; the decision is in the site."""
    from helpers import vmap_wins
    vmap_wins(monkeypatch)
    model = Gated().eval()
    result = fxfuse.fuse(model, (torch.randn(6, 4, 8),), benchmark=False)
    (site,) = [s for s in result.sites if s.fused]
    assert site.lowering == "vmap" and dict(site.timings).keys() >= {"loop", "vmap"}
    other = torch.randn(9, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(result.model(other), model(other))


class Recurrent(nn.Module):
    def __init__(self, n: int = 4, d: int = 8):
        super().__init__()
        self.cells = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x):
        h, outs = x, []
        for cell in self.cells:
            h = torch.tanh(cell(h))
            outs.append(h)
        return torch.stack(outs, 1)


class SharedIntermediate(nn.Module):
    """Row i adds row i-1's pre-activation: the rows read each other's intermediates."""

    def __init__(self, n: int = 4, d: int = 8):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x):
        pre = [fc(x[:, i]) for i, fc in enumerate(self.fc)]
        outs = [torch.relu(pre[i] + (pre[i - 1] if i else 0)) for i in range(len(pre))]
        return torch.stack(outs, 1)


class Dropped(nn.Module):
    def __init__(self, n: int = 4, d: int = 8):
        super().__init__()
        self.fc = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Dropout(0.5))
                                for _ in range(n))

    def forward(self, x):
        return torch.stack([fc(x[:, i]) for i, fc in enumerate(self.fc)], 1)


class MixedConfig(nn.Module):
    """Two rows with GELU, two with tanh-approximate GELU: two groups of two."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(d, d) for _ in range(4))
        self.act = nn.ModuleList(nn.GELU(approximate=a) for a in ("none", "none", "tanh", "tanh"))

    def forward(self, x):
        return torch.stack([self.act[i](self.fc[i](x[:, i])) for i in range(4)], 1)


def test_recurrence_is_refused_as_loop_carried():
    model = Recurrent().eval()
    result = fxfuse.fuse(model, (torch.randn(3, 8),), lowering="vmap", benchmark=False)
    assert not result.changed
    assert any("loop-carried" in s.reason for s in result.sites), result.sites


def test_rows_reading_each_others_intermediates_stay_exact():
    """Row i reads row i-1's pre-activation: that value is shared, so only what follows
    it can be a row; whatever is fused, the model computes what it did."""
    model = SharedIntermediate().eval()
    result = fxfuse.fuse(model, (torch.randn(3, 4, 8),), lowering="vmap", benchmark=False)
    other = torch.randn(5, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(result.model(other), model(other))


def test_random_ops_in_train_mode_are_refused():
    model = Dropped().train()
    result = fxfuse.fuse(model, (torch.randn(3, 4, 8),), lowering="vmap", benchmark=False,
                         check_grads=False)
    assert not result.changed
    assert any("random" in s.reason for s in result.sites), [s.reason for s in result.sites]
    eval_result = fxfuse.fuse(model.eval(), (torch.randn(3, 4, 8),), lowering="vmap",
                              benchmark=False)
    assert [s.lowering for s in eval_result.sites if s.fused] == ["vmap"]


def test_rows_of_different_configuration_fuse_in_groups():
    model = MixedConfig().eval()
    result = fxfuse.fuse(model, (torch.randn(3, 4, 8),), lowering="vmap", benchmark=False)
    assert sorted(s.rows for s in result.sites if s.fused) == [2, 2]
    other = torch.randn(5, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(result.model(other), model(other))
