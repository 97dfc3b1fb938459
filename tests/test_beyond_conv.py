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
from torch import nn

import fxfuse
from helpers import assert_same as _assert_same, fuse as _fuse, module_types as _module_types
from helpers import rewrites_win
from zoo.heads import Heads, HeadsIntoBuffer, ScalarHeads, SummedHeads
from zoo.towers import (AppliedTwice, CarriedDependency, FunctionalChain, PadBetweenSites,
                        ShapeBoundTower, SharedBatchNorm, SoftmaxRows, SourceReassigned, Subset,
                        Summed, Tower, TwoKernels, TwoSites, convs)


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


@pytest.mark.parametrize("factory", [SourceReassigned, SoftmaxRows],
                         ids=["source-reassigned", "softmax-per-row"])
def test_refused_by_kinds_vectorised(factory):
    """Rows that read a tensor reassigned between rows, or run softmax: the row-op kinds
    refuse them; by structure they are the same code per row and fuse under vmap."""
    model = factory().train()
    x = torch.randn(2, 3, 4, 10)
    result = fxfuse.fuse(model, (x,), lowering="vmap", benchmark=False)
    assert [s.lowering for s in result.sites if s.fused] == ["vmap"]
    # at most one row runs as it was (the last source of SourceReassigned is its own)
    assert len([n for n in result.model.graph.nodes if n.op == "call_module"]) <= 1, \
        result.model.code
    other = torch.randn(5, 3, 4, 10)
    torch.testing.assert_close(result.model.eval()(other), copy.deepcopy(model).eval()(other))


@pytest.mark.parametrize("factory,words", [
    (CarriedDependency, ["loop-carried", "row 1", "row 0"]),
    (SharedBatchNorm, ["BatchNorm1d", "statistics"]),
], ids=["loop-carried", "shared-bn-train"])
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
            self.convs = convs(3, 3, 3)

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


def test_pointwise_with_tensor_operand_is_vectorised():
    """``conv(x_h) * gate`` with a gate shared by all rows: not a row-op kind, but the
    same code per row; under a forced lowering it is vectorised (the gate unbatched)."""
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = convs(3, 3, 3)

        def forward(self, x, gate):
            return torch.stack([c(x[:, :, h]) * gate for h, c in enumerate(self.convs)], 2)

    model = Gated().eval()
    x, gate = torch.randn(2, 3, 3, 8), torch.randn(2, 3, 8)
    result = fxfuse.fuse(model, (x, gate), lowering="grouped", benchmark=False)
    assert [s.lowering for s in result.sites if s.fused] == ["vmap"]
    assert not [n for n in result.model.graph.nodes if n.op == "call_module"]
    x2, gate2 = torch.randn(5, 3, 3, 8), torch.randn(5, 3, 8)
    torch.testing.assert_close(result.model(x2, gate2), model(x2, gate2))


@pytest.mark.parametrize("tracer", ["symbolic", "export"])
def test_pad_between_sites_stays_exact(tracer):
    model = PadBetweenSites().eval()
    x = torch.randn(2, 6, 12, 4)
    result = fxfuse.fuse(model, (x,), lowering="grouped", benchmark=False, tracer=tracer)
    assert [s.lowering for s in result.sites] == ["grouped", "grouped"]
    other = torch.randn(3, 6, 12, 4)
    torch.testing.assert_close(result.model(other), model(other), rtol=1e-4, atol=1e-5)


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


def test_exported_tower_in_train_mode_is_vectorised_in_its_fixed_mode():
    """The row-op kinds refuse batch norm in an exported train-mode graph; the export
    already fixed the mode, so the rows vectorise exactly and the mode stays fixed."""
    model = ShapeBoundTower().train()
    x = torch.randn(2, 3, 3, 8)
    result = fxfuse.fuse(model, (x,), lowering="grouped", benchmark=False)
    assert any("batch_norm" in s.reason for s in result.sites if not s.fused) or \
        [s.lowering for s in result.sites] == ["vmap"]
    assert [s.lowering for s in result.sites if s.fused] == ["vmap"]
    with pytest.raises(NotImplementedError):
        copy.deepcopy(result.model).eval()


@pytest.mark.parametrize("lowering", ["grouped", "grouped2d", "auto"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_loop_module_applied_twice_shares_fused_weights(lowering, train, monkeypatch):
    rewrites_win(monkeypatch)          # under "auto": the rule's choice, not the machine's
    model = AppliedTwice().train(train)
    result = _fuse(model, torch.randn(4, 4, 3, 10), lowering)
    assert len(result.sites) == 2 and all(s.fused for s in result.sites), result.sites
    assert len({s.lowering for s in result.sites}) == 1
    fused = [n for n, m in result.model.named_children() if n.endswith(("_fused", "_fused_1"))]
    assert len(fused) == 2, result.model.code          # one conv, one batch norm, shared
    calls = [str(n.target) for n in result.model.graph.nodes if n.op == "call_module"]
    assert all(calls.count(name) == 2 for name in fused)
    _assert_same(model, result, torch.randn(5, 4, 3, 10), train)
