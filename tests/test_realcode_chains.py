"""Real-code loops whose rows are reshaped around the layer, or are small DAGs (gated
residual towers), and the reasons given when such loops are left alone.

Each model goes through the default path and ``lowering="grouped"``, in eval and train
mode; the fused graph is checked at another batch size (outputs, input and parameter
gradients mapped back through the weight map) and must not call the per-row layers.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from fxfuse.structural.fusion import RowsByStructure
from helpers import assert_same, module_types
from zoo.realcode import FlattenHead, ReshapeHeads, VariableGRNs


# ------------------------------------------------------------------ models of our own

class ViewHeads(nn.Module):
    """Rows on dim 2, ``contiguous().view(B, -1)`` then a Linear, one shared Dropout."""

    def __init__(self, n=3, a=4, b=5, out=6):
        super().__init__()
        self.n = n
        self.heads = nn.ModuleList([nn.Linear(a * b, out) for _ in range(n)])
        self.drop = nn.Dropout(0.2)

    def forward(self, x):  # (B, a, n, b)
        bs = x.size(0)
        outs = []
        for i in range(self.n):
            z = x[:, :, i, :].contiguous().view(bs, -1)
            outs.append(self.drop(self.heads[i](z)))
        return torch.stack(outs, dim=-1)


class UnflattenTowers(nn.Module):
    """Rows of a (B, n, a*b) tensor split back to (a, b) by ``nn.Unflatten`` modules, a
    per-row Linear tower on the last dim, flattened again before the stack."""

    def __init__(self, n=4, a=3, b=5, hidden=7):
        super().__init__()
        self.unflat = nn.ModuleList(nn.Unflatten(-1, (a, b)) for _ in range(n))
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(b, hidden), nn.GELU(), nn.Linear(hidden, 2)) for _ in range(n))

    def forward(self, x):
        return torch.stack([torch.flatten(t(u(x[:, i])), 1)
                            for i, (u, t) in enumerate(zip(self.unflat, self.towers))], 1)


class FunctionalGate(nn.Module):
    """A GLU gate and a residual written with functions and methods, rows as (B, d)."""

    def __init__(self, n=5, d=6):
        super().__init__()
        self.lin = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.gate = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(n))

    def forward(self, x):  # (B, n, d)
        outs = []
        for i, xi in enumerate(torch.unbind(x, dim=1)):
            h = F.elu(self.lin[i](xi))
            g = torch.sigmoid(self.gate[i](h)).mul(h)
            outs.append(self.norm[i](g.add(xi)))
        return torch.stack(outs, 1)


class ResidualConvRows(nn.Module):
    """A residual conv block per row: ``x_h + conv(relu(conv(x_h)))``: a DAG in the
    grouped-conv layout."""

    def __init__(self, H=4, C=3):
        super().__init__()
        self.c1 = nn.ModuleList(nn.Conv1d(C, C, 3, padding=1) for _ in range(H))
        self.c2 = nn.ModuleList(nn.Conv1d(C, C, 3, padding=1) for _ in range(H))

    def forward(self, x):  # (B, C, H, L)
        return torch.stack([x[:, :, h] + c2(F.relu(c1(x[:, :, h])))
                            for h, (c1, c2) in enumerate(zip(self.c1, self.c2))], 2)


class SharedGRN(nn.Module):
    """One GRN applied to every variable: rows folded into the batch."""

    def __init__(self, n=3, d=6):
        super().__init__()
        self.n = n
        self.grn = VariableGRNs(n_vars=1, d=d).single_variable_grns[0]

    def forward(self, x):  # (B, T, n, d)
        return torch.stack([self.grn(x[:, :, i, :]) for i in range(self.n)], dim=-1)


CASES = [
    # (id, factory, input shape, rows, row layer modules that must be gone)
    ("flatten-head", FlattenHead, (4, 4, 6, 5), 4, "Linear"),
    ("reshape-heads", ReshapeHeads, (4, 3, 4, 5), 3, "Linear"),
    ("view-heads-dim2", ViewHeads, (4, 4, 3, 5), 3, "Linear"),
    ("unflatten-towers", UnflattenTowers, (4, 4, 15), 4, "Linear"),
    ("grn", VariableGRNs, (4, 5, 4, 6), 4, "Linear"),
    ("grn-skip", lambda: VariableGRNs(out=5), (4, 5, 4, 6), 4, "Linear"),
    ("functional-gate", FunctionalGate, (4, 5, 6), 5, "Linear"),
    ("residual-conv", ResidualConvRows, (4, 3, 4, 12), 4, "Conv1d"),
]


def _fuse(model, x, lowering):
    options = {"auto_rounds": 2} if lowering == "auto" else {}
    return fxfuse.fuse(model, (x,), lowering=lowering, benchmark=False, **options)


@pytest.mark.parametrize("lowering", ["auto", "grouped"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,factory,shape,rows,layer", CASES, ids=[c[0] for c in CASES])
def test_rows_fuse_exactly(name, factory, shape, rows, layer, train, lowering):
    torch.manual_seed(0)
    model = factory().train(train)
    x = torch.randn(*shape)
    result = _fuse(model, x, lowering)
    assert len(result.sites) == 1, [s.reason for s in result.sites]
    site = result.sites[0]
    assert site.fusable, site.reason
    assert site.rows == rows
    if lowering == "grouped":
        assert site.fused
        per_row = {n for n, m in model.named_modules() if type(m).__name__ == layer}
        called = {str(n.target) for n in result.model.graph.nodes if n.op == "call_module"}
        assert per_row and not per_row & called, result.model.code
        assert "getitem" not in result.model.code, result.model.code     # no row slice left
    else:
        assert site.fused or site.lowering == "loop"
    assert_same(model, result, torch.randn(shape[0] + 3, *shape[1:]), train)


def test_grn_rows_are_one_dag_per_variable():
    result = _fuse(VariableGRNs(out=5).eval(), torch.randn(2, 5, 4, 6), "grouped")
    site = result.sites[0]
    assert [s.split()[0] for s in site.steps].count("linear") == 5
    assert {"mul", "add", "layernorm"} <= {s.split()[0] for s in site.steps}
    code = result.model.code
    assert code.count("einsum(") == 5 and code.count("layer_norm(") == 1, code


def test_shared_grn_folds_rows_into_the_batch():
    torch.manual_seed(0)
    model = SharedGRN().eval()
    x = torch.randn(3, 5, 3, 6)
    result = _fuse(model, x, "grouped")
    assert [s.lowering for s in result.sites] == ["batched"], [s.reason for s in result.sites]
    assert module_types(result.model).count("Linear") == 4      # each layer called once
    assert_same(model, result, torch.randn(5, 5, 3, 6), False)


# ------------------------------------------------------------------ true reasons

class BiasDiffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(6, 3, bias=i == 0) for i in range(2))

    def forward(self, x):
        return torch.stack([lin(x[:, i]) for i, lin in enumerate(self.lins)], 1)


class LinearsAndInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))

    def forward(self, x):
        return torch.cat([lin(x[:, i]) for i, lin in enumerate(self.lins)] + [x[:, 0]], 1)


class SplitCarried(nn.Module):
    """Each row's Linear reads half of the previous row's output, through a ``split``."""

    def __init__(self, n=3, d=4):
        super().__init__()
        self.d = d
        self.lins = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(n))

    def forward(self, x):  # (B, d)
        h, outs = x, []
        for lin in self.lins:
            out, h = lin(h).split(self.d, dim=-1)
            outs.append(out)
        return torch.stack(outs, 1)


@pytest.mark.parametrize("factory,shape,words,not_words", [
    (BiasDiffers, (3, 2, 6), ("rows differ", "bias True vs False"), ("frozen",)),
    (LinearsAndInput, (3, 3, 6), ("not per-row Linear outputs",), ("conv",)),
    (SplitCarried, (3, 4), ("loop-carried", "row 1", "row 0"), ("different tensors",)),
], ids=["bias-differs", "linear-rows-not-conv", "carried-through-split"])
def test_reasons_are_true(factory, shape, words, not_words, monkeypatch):
    """The row-op kinds' reasons (the structural fusion is switched off here: it may
    vectorise some of these loops)."""
    monkeypatch.setattr(RowsByStructure, "find", lambda self, gm, ctx: [])
    model = factory().eval()
    x = torch.randn(*shape)
    result = _fuse(model, x, "auto")
    assert len(result.sites) == 1 and not result.changed
    reason = result.sites[0].reason
    assert all(w in reason for w in words) and not any(w in reason for w in not_words), reason
    torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=0)


def test_sum_across_rows_is_not_a_dag():
    """``lin_a(x_a) + lin_b(x_b)`` reads two rows: still a sum of rows, not one row."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)

        def forward(self, x):
            return self.a(x[:, 0]) + self.b(x[:, 1])

    result = _fuse(Two().eval(), torch.randn(3, 2, 6), "grouped")
    assert [s.combine_kind for s in result.sites] == ["sum"]
