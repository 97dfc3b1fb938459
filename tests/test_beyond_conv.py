"""Loops beyond one conv per row: towers, Linear heads, mixed rows, sums, chained sites.

Each positive case checks the new graph's structure (which stock modules/ops replaced the
rows, no per-row layer left) and the numbers against the original in eval and train mode
(outputs, input and parameter gradients, BatchNorm running statistics after a step).
"""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxfuse


def _convs(n, c_in, c_out, k=3, **kw):
    return nn.ModuleList(nn.Conv1d(c_in, c_out, k, padding=k // 2, **kw) for _ in range(n))


class Tower(nn.Module):
    """Sequential(Conv1d, BatchNorm1d, ReLU, Dropout, Conv1d) per row."""

    def __init__(self, h=4, c=3):
        super().__init__()
        self.rows = nn.ModuleList(nn.Sequential(
            nn.Conv1d(c, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
            nn.Conv1d(8, 5, 3)) for _ in range(h))

    def forward(self, x):
        return torch.stack([row(x[:, :, h]) for h, row in enumerate(self.rows)], dim=2)


class FunctionalChain(nn.Module):
    """``F.gelu(conv_h(x_h).contiguous()) * 0.5 + 1.0`` per row, then ``cat`` on channels."""

    def __init__(self, h=5):
        super().__init__()
        self.convs = _convs(h, 3, 4)

    def forward(self, x):
        return torch.cat([F.gelu(c(x[:, :, i]).contiguous()) * 0.5 + 1.0
                          for i, c in enumerate(self.convs)], 1)


class Heads(nn.Module):
    """Per-variable ``Linear(L, P)`` heads on ``x[:, i, :]``, stacked (forecasting style)."""

    def __init__(self, v=6, length=16, p=4, bias=True):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(length, p, bias=bias) for _ in range(v))

    def forward(self, x):
        return torch.stack([head(x[:, i, :]) for i, head in enumerate(self.heads)], dim=1)


class HeadsIntoBuffer(Heads):
    """``out = torch.zeros(...); out[:, i, :] = heads[i](x[:, i, :])`` with a shape-bound loop."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], x.shape[1], self.heads[0].out_features)
        for i in range(x.shape[1]):
            out[:, i, :] = self.heads[i](x[:, i, :])
        return out


class ScalarHeads(nn.Module):
    """``Linear(1, h)`` per variable: a broadcast multiply-add."""

    def __init__(self, v=5, h=7):
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(1, h) for _ in range(v))

    def forward(self, x):
        return torch.stack([F.relu(e(x[:, i].unsqueeze(-1))) for i, e in enumerate(self.embed)], 1)


class TwoKernels(nn.Module):
    """Rows alternate two kernel sizes ('same' padding): fused as two groups."""

    def __init__(self, h=6):
        super().__init__()
        self.rows = nn.ModuleList(nn.Conv1d(3, 4, 3 if i % 2 else 5, padding="same")
                                  for i in range(h))

    def forward(self, x):
        return torch.stack([r(x[:, :, h]) for h, r in enumerate(self.rows)], dim=2)


class Subset(nn.Module):
    """Rows 4, 1, 3 only, in that order: gathered."""

    def __init__(self):
        super().__init__()
        self.convs = _convs(3, 3, 4)

    def forward(self, x):
        return torch.stack([c(x[:, :, r]) for c, r in zip(self.convs, (4, 1, 3))], dim=2)


class Summed(nn.Module):
    def __init__(self, how="stack-sum"):
        super().__init__()
        self.how = how
        self.convs = _convs(4, 3, 6)

    def forward(self, x):
        outs = [c(x[:, :, h]) for h, c in enumerate(self.convs)]
        if self.how == "builtin-sum":
            return sum(outs)
        if self.how == "stack-mean":
            return torch.stack(outs, -1).mean(-1)
        return torch.stack(outs, 0).sum(0)


class SummedHeads(Heads):
    def forward(self, x):
        return torch.stack([head(x[:, i]) for i, head in enumerate(self.heads)], 0).sum(0)


class TwoSites(nn.Module):
    """Site 2 reads site 1's result through a ReLU: the layout flows through."""

    def __init__(self, h=4, c=6):
        super().__init__()
        self.a, self.b, self.h = _convs(h, c, c), _convs(h, c, c), h

    def forward(self, x):
        y = torch.stack([self.a[i](x[:, :, i]) for i in range(self.h)], 2).relu()
        return torch.stack([self.b[i](y[:, :, i]) for i in range(self.h)], 2)


def _fuse(model, x, lowering="grouped"):
    return fxfuse.fuse(model, (x,), lowering=lowering, benchmark=False)


def _assert_same(model, result, x, train):
    """Outputs, gradients and buffers after one step agree with the original's."""
    ref, new = copy.deepcopy(model).train(train), copy.deepcopy(result.model).train(train)
    for m in (ref, new):
        for mod in m.modules():
            if isinstance(mod, nn.Dropout):
                mod.eval()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [ref(xs[0]), new(xs[1])]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    g = torch.randn_like(outs[0])
    for out in outs:
        out.backward(g)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-5)
    grads = result.weight_map.to_original({k: p.grad for k, p in new.named_parameters()},
                                          strict=False)
    for key, p in ref.named_parameters():
        torch.testing.assert_close(grads[key], p.grad, rtol=1e-4, atol=1e-4)
    state = result.weight_map.to_original(new.state_dict())
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)


def _module_types(gm: fx.GraphModule) -> list[str]:
    return [type(gm.get_submodule(str(n.target))).__name__ for n in gm.graph.nodes
            if n.op == "call_module" and n.target != "_guards_fn"]   # torch.export's own


CASES = [
    # (id, factory, input shape, lowering label, new module types expected)
    ("tower", Tower, (4, 3, 4, 16), "grouped", ["Conv1d", "BatchNorm1d", "ReLU", "Dropout", "Conv1d"]),
    ("tower-2d", Tower, (4, 3, 4, 16), "grouped2d",
     ["Conv2d", "BatchNorm1d", "ReLU", "Dropout", "Conv2d"]),
    ("functional-chain", FunctionalChain, (3, 3, 5, 12), "grouped", ["Conv1d"]),
    ("linear-heads", Heads, (5, 6, 16), "bmm", []),
    ("linear-heads-no-bias", lambda: Heads(bias=False), (5, 6, 16), "bmm", []),
    ("linear-heads-buffer", HeadsIntoBuffer, (5, 6, 16), "bmm", []),
    ("linear-1-to-h", ScalarHeads, (8, 5), "bmm", []),
    ("two-kernels", TwoKernels, (3, 3, 6, 16), "grouped", ["Conv1d", "Conv1d"]),
    ("subset-reordered", Subset, (3, 3, 6, 16), "grouped", ["Conv1d"]),
    ("builtin-sum", lambda: Summed("builtin-sum"), (3, 3, 4, 16), "dense", ["Conv1d"]),
    ("stack-sum", lambda: Summed("stack-sum"), (3, 3, 4, 16), "dense", ["Conv1d"]),
    ("stack-mean", lambda: Summed("stack-mean"), (3, 3, 4, 16), "dense", ["Conv1d"]),
    ("summed-heads", SummedHeads, (5, 6, 16), "dense", ["Linear"]),
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,factory,shape,label,modules", CASES, ids=[c[0] for c in CASES])
def test_fuses_exactly(name, factory, shape, label, modules, train):
    torch.manual_seed(0)
    model = factory().train(train)
    x = torch.randn(*shape)
    result = _fuse(model, x, "grouped2d" if label == "grouped2d" else "grouped")
    assert [s.lowering for s in result.sites] == [label], [s.reason for s in result.sites]
    site = result.sites[0]
    assert site.loop_kind and site.steps
    assert _module_types(result.model) == modules, result.model.code
    per_row = {t for t in site.targets}
    assert not any(str(n.target).rpartition(".")[0] in per_row or str(n.target) in per_row
                   for n in result.model.graph.nodes if n.op in ("call_module", "get_attr")), \
        result.model.code
    if name.startswith("linear-heads") and name != "linear-1-to-h":
        assert any(n.target in (torch.baddbmm, torch.bmm) for n in result.model.graph.nodes)
    _assert_same(model, result, torch.randn(shape[0] + 3, *shape[1:]), train)
    if name == "tower":   # module-free groups: BatchNorm1d(H*C) holds the rows' statistics
        bn = next(m for m in result.model.modules() if isinstance(m, nn.BatchNorm1d))
        assert bn.num_features == 4 * 8


def test_mixed_rows_report_groups():
    result = _fuse(TwoKernels().eval(), torch.randn(2, 3, 6, 16))
    site = result.sites[0]
    assert site.groups == ((0, 2, 4), (1, 3, 5))
    assert any("2 groups" in n for n in site.notes)


def test_consecutive_sites_share_layout():
    model = TwoSites().eval()
    x = torch.randn(3, 6, 4, 20)
    result = _fuse(model, x)
    assert [s.lowering for s in result.sites] == ["grouped", "grouped"]
    gm = result.model
    copies = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "contiguous"]
    permutes = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "permute"]
    assert len(copies) == 1 and len(permutes) == 2, gm.code   # in once, out once
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


class CarriedDependency(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = _convs(4, 3, 3)

    def forward(self, x):
        prev, outs = 0, []
        for h, conv in enumerate(self.convs):
            prev = conv(x[:, :, h] + prev)
            outs.append(prev)
        return torch.stack(outs, 2)


class SourceReassigned(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = _convs(4, 3, 3)

    def forward(self, x):
        outs = []
        for h, conv in enumerate(self.convs):
            outs.append(conv(x[:, :, h]))
            x = x * 2
        return torch.stack(outs, 2)


class SoftmaxRows(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = _convs(4, 3, 3)

    def forward(self, x):
        return torch.stack([c(x[:, :, h]).softmax(-1) for h, c in enumerate(self.convs)], 2)


class SharedBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(3, 3, 3, padding=1), nn.BatchNorm1d(3)

    def forward(self, x):
        return torch.stack([self.bn(self.conv(x[:, :, h])) for h in range(4)], 2)


@pytest.mark.parametrize("factory,words", [
    (CarriedDependency, ["rows", "different"]),
    (SourceReassigned, ["different tensors"]),
    (SoftmaxRows, ["softmax"]),
    (SharedBatchNorm, ["BatchNorm1d", "statistics"]),
], ids=["loop-carried", "source-reassigned", "softmax-per-row", "shared-bn-train"])
def test_left_alone(factory, words):
    model = factory().train()
    x = torch.randn(2, 3, 4, 10)
    result = _fuse(model, x)
    assert len(result.sites) == 1 and not result.changed
    for word in words:
        assert word in result.sites[0].reason, result.sites[0].reason
    ref = copy.deepcopy(model).eval()
    torch.testing.assert_close(result.model.eval()(x), ref(x), rtol=0, atol=0)


def test_data_dependent_control_flow_is_a_trace_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = _convs(3, 3, 3)

        def forward(self, x):
            outs = [c(x[:, :, h]) if x[:, :, h].sum() > 0 else x[:, :, h]
                    for h, c in enumerate(self.convs)]
            return torch.stack(outs, 2)

    with pytest.raises(fxfuse.TraceError) as err:
        _fuse(Branchy(), torch.randn(2, 3, 3, 8))
    assert "\n" not in str(err.value)


def test_weight_map_round_trip_is_bit_exact_for_every_kind():
    for factory, shape in [(Tower, (2, 3, 4, 16)), (Heads, (2, 6, 16)),
                           (lambda: Summed("builtin-sum"), (2, 3, 4, 16)),
                           (TwoKernels, (2, 3, 6, 16))]:
        model = factory().eval()
        result = _fuse(model, torch.randn(*shape))
        back = result.weight_map.to_original(result.model.state_dict())
        assert back.keys() == model.state_dict().keys()
        assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
        again = result.weight_map.to_fused(back)
        assert all(torch.equal(again[k], v) for k, v in result.model.state_dict().items())


def test_pointwise_with_tensor_operand_is_not_a_row_op():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = _convs(3, 3, 3)

        def forward(self, x, gate):
            return torch.stack([c(x[:, :, h]) * gate for h, c in enumerate(self.convs)], 2)

    model = Gated().eval()
    x, gate = torch.randn(2, 3, 3, 8), torch.randn(2, 3, 8)
    result = fxfuse.fuse(model, (x, gate), lowering="grouped", benchmark=False)
    assert not result.changed
    assert operator.mul in {n.target for n in result.model.graph.nodes}


class PadBetweenSites(nn.Module):
    """Site 1's result is padded on its row dim before site 2 reads rows from it: the pad
    must stay where it is, not be moved across the permutes between the sites."""

    def __init__(self, h=4, c=6):
        super().__init__()
        self.a, self.b, self.h = _convs(h, c, c), _convs(h + 3, c, c), h

    def forward(self, x):
        y = torch.stack([self.a[i](x[..., i]) for i in range(self.h)], -1)
        y = F.pad(y, (2, 1), value=0.5)
        return torch.stack([self.b[i](y[..., i]) for i in range(self.h + 3)], -1)


@pytest.mark.parametrize("tracer", ["symbolic", "export"])
def test_pad_between_sites_stays_exact(tracer):
    model = PadBetweenSites().eval()
    x = torch.randn(2, 6, 12, 4)
    result = fxfuse.fuse(model, (x,), lowering="grouped", benchmark=False, tracer=tracer)
    assert [s.lowering for s in result.sites] == ["grouped", "grouped"]
    other = torch.randn(3, 6, 12, 4)
    torch.testing.assert_close(result.model(other), model(other), rtol=1e-4, atol=1e-5)


class ShapeBoundTower(nn.Module):
    """A Conv1d → BatchNorm1d → ReLU → Conv1d tower per row, loop bound from the input's
    shape, written into a buffer: only torch.export can trace it (``aten.batch_norm``)."""

    def __init__(self, h=3):
        super().__init__()
        self.rows = nn.ModuleList(nn.Sequential(
            nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 2, 3))
            for _ in range(h))
        with torch.no_grad():
            for row in self.rows:
                row[1].running_mean.uniform_(-1, 1)
                row[1].running_var.uniform_(0.5, 2)
                row[1].num_batches_tracked.fill_(7)

    def forward(self, x):
        out = x.new_zeros(x.shape[0], 2, x.shape[2], x.shape[3] - 2)
        for h in range(x.shape[2]):
            out[:, :, h] = self.rows[h](x[:, :, h])
        return out


def test_exported_tower_with_batchnorm_fuses_in_eval():
    model = ShapeBoundTower().eval()
    result = _fuse(model, torch.randn(2, 3, 3, 8))
    assert result.tracer == "export"
    assert [s.lowering for s in result.sites] == ["grouped"], result.sites[0].reason
    assert "batchnorm" in result.sites[0].loop_kind
    bn = [m for m in result.model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bn) == 1 and bn[0].num_features == 3 * 4 and not bn[0].training
    x = torch.randn(5, 3, 3, 8)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)
    back = result.weight_map.to_original(result.model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_exported_tower_in_train_mode_is_left_alone_with_a_reason():
    model = ShapeBoundTower().train()
    result = _fuse(model, torch.randn(2, 3, 3, 8))
    assert not result.changed and "batch_norm" in result.sites[0].reason


class RowBlock(nn.Module):
    def __init__(self, c=4, h=3):
        super().__init__()
        self.h = h
        self.rows = nn.ModuleList(nn.Sequential(nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c),
                                                nn.ReLU()) for _ in range(h))

    def forward(self, x):
        return torch.stack([self.rows[i](x[:, :, i]) for i in range(self.h)], 2)


class AppliedTwice(nn.Module):
    """One loop module applied twice: both loops fuse into the same fused modules."""

    def __init__(self):
        super().__init__()
        self.block = RowBlock()

    def forward(self, x):
        return self.block(self.block(x) + 1.0)


@pytest.mark.parametrize("lowering", ["grouped", "grouped2d", "auto"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_loop_module_applied_twice_shares_fused_weights(lowering, train):
    model = AppliedTwice().train(train)
    result = _fuse(model, torch.randn(4, 4, 3, 10), lowering)
    assert len(result.sites) == 2 and all(s.fused for s in result.sites), result.sites
    assert len({s.lowering for s in result.sites}) == 1
    fused = [n for n, m in result.model.named_children() if n.endswith(("_fused", "_fused_1"))]
    assert len(fused) == 2, result.model.code          # one conv, one batch norm, shared
    calls = [str(n.target) for n in result.model.graph.nodes if n.op == "call_module"]
    assert all(calls.count(name) == 2 for name in fused)
    _assert_same(model, result, torch.randn(5, 4, 3, 10), train)
