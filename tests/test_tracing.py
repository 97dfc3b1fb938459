"""Tracing and trace fidelity: the traced graph computes what the model does, on inputs
it never saw, before any rewrite; models each tracer alone refuses still come back
traced, checked and (where the matcher can) fused."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import fxfuse
from fxfuse.check.fidelity import check_trace
from fxfuse.trace.tracing import distinct_inputs

from conftest import check_grads, fresh_inputs, leaves


def _same(model, result, inputs, **tol):
    """The returned model and the original agree on ``inputs`` (eval mode)."""
    ref_model = copy.deepcopy(model).eval() if not _has_wn(model) else model.eval()
    new_model = copy.deepcopy(result.model)
    try:
        new_model.eval()
    except (NotImplementedError, RuntimeError):
        pass
    with torch.no_grad():
        ref, got = ref_model(*inputs), new_model(*inputs)
    for r, g in zip(leaves(ref), leaves(got), strict=True):
        torch.testing.assert_close(g, r, **(tol or {"rtol": 1e-4, "atol": 1e-5}))


def _has_wn(model):
    from fxfuse.trace.prepare import weight_norm_modules
    return bool(weight_norm_modules(model))


def _fused(result):
    return sum(s.fused for s in result.sites)


# ------------------------------------------------------------------ aliased inputs

class CrossAttend(nn.Module):
    """Self-attention-style block: callers pass the same tensor for query and key."""

    def __init__(self, d=8):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, query, key):
        w = torch.softmax(self.q(query) @ self.k(key).transpose(1, 2) / 8 ** 0.5, -1)
        return w @ self.v(key)


class CrossAttendShapeBound(CrossAttend):
    """The same, with a shape-read branch so only torch.export traces it."""

    def forward(self, query, key):
        for _ in range(key.shape[1] // key.shape[1]):
            query = query * 1.0
        return super().forward(query, key)


class RowsPlusContext(nn.Module):
    """A per-row conv loop on ``x``, plus a ``context`` that callers often pass as x."""

    def __init__(self, rows=3):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(2, 2, 3, padding=1) for _ in range(rows))

    def forward(self, x, context):
        out = torch.stack([conv(x[:, :, h]) for h, conv in enumerate(self.convs)], 2)
        return out + 0.5 * context


def _aliases(x, how):
    return (x, x) if how == "same" else (x, x.view(x.shape))


@pytest.mark.parametrize("tracer", ["auto", "export"])
@pytest.mark.parametrize("how", ["same", "view"])
@pytest.mark.parametrize("make", [CrossAttend, CrossAttendShapeBound])
def test_aliased_inputs_not_fused(make, how, tracer):
    model = make().eval()
    x = torch.randn(2, 5, 8)
    result = fxfuse.fuse(model, _aliases(x, how), benchmark=False, tracer=tracer)
    # k and v read one input and may fuse as siblings; q reads the other input, never
    assert all(s.loop_kind == "siblings" and "q" not in s.targets
               for s in result.sites if s.fused)
    assert any("share memory" in n for n in result.notes), result.notes
    assert result.trace_check is not None and len(result.trace_check.checks) >= 2
    assert "trace check" in result.report() and "share memory" in result.report()
    q, k = fresh_inputs((x, x), 3, seed=4)           # distinct, never seen while tracing
    assert not torch.equal(q, k)
    _same(model, result, (q, k))
    _same(model, result, _aliases(torch.randn(4, 5, 8), how))


@pytest.mark.parametrize("tracer", ["auto", "export"])
@pytest.mark.parametrize("how", ["same", "view"])
def test_aliased_inputs_fused(how, tracer):
    model = RowsPlusContext().eval()
    x = torch.randn(2, 2, 3, 7)
    result = fxfuse.fuse(model, _aliases(x, how), benchmark=False, tracer=tracer)
    assert _fused(result) == 1 or result.sites[0].lowering == "loop"
    assert any("share memory" in n for n in result.notes)
    assert result.verification is not None or not result.changed
    _same(model, result, fresh_inputs((x, x), 5, seed=3))
    check_grads(model, result.model, fresh_inputs((x, x), 4, seed=5), result.weight_map)


def test_distinct_inputs_clones_only_overlaps():
    x = torch.randn(4, 6)
    a, b, c = x[:2], x[2:], x[1:3]
    out, aliased = distinct_inputs((a, b, c, (x, 3)))
    assert aliased == (2, 3)              # c overlaps a and b; x overlaps all
    assert out[0] is a and out[1] is b and out[2] is not c
    assert torch.equal(out[2], c) and out[3][1] == 3


# ------------------------------------------------------------------ signatures

class VarHeads(nn.Module):
    """``forward(self, *series)``: one Linear head per series."""

    def __init__(self, n=3, d=4):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, 2) for _ in range(n))

    def forward(self, *series):
        return torch.stack([head(s) for head, s in zip(self.heads, series)], 1)


class VarRows(nn.Module):
    """``forward(self, x, *extra)``: a per-row conv loop on x, extras added after."""

    def __init__(self, rows=3):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(2, 3, 3, padding=1) for _ in range(rows))

    def forward(self, *xs):
        x = xs[0]
        out = torch.stack([conv(x[:, :, h]) for h, conv in enumerate(self.convs)], 2)
        for extra in xs[1:]:
            out = out + extra.mean()
        return out


class NestedPair(nn.Module):
    """``forward(self, pair)`` with ``pair = (x, y)``, a loop bound read from the shape."""

    def __init__(self, rows=3):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(2, 2, 3, padding=1) for _ in range(rows))

    def forward(self, pair):
        x, y = pair
        out = torch.stack([self.convs[h](x[:, :, h]) for h in range(x.shape[2])], 2)
        return out * y.sigmoid().mean()


@pytest.mark.parametrize("make,inputs,fused", [
    (VarHeads, lambda: tuple(torch.randn(6, 4) for _ in range(3)), None),
    (VarRows, lambda: (torch.randn(2, 2, 3, 7), torch.randn(2, 5)), 1),
    (NestedPair, lambda: ((torch.randn(2, 2, 3, 7), torch.randn(2, 4)),), 1),
], ids=["varargs-heads", "varargs-rows", "nested-tuple"])
def test_signature_keeps_dynamic_batch(make, inputs, fused):
    model = make().eval()
    inputs = inputs()
    result = fxfuse.fuse(model, inputs, benchmark=False)
    assert result.tracer == "export" or not result.changed or result.tracer == "symbolic"
    if fused is not None:
        assert _fused(result) == fused or result.sites[0].lowering == "loop"
    assert result.batch_sizes is None, result.report()
    assert "batch sizes accepted: any" in result.report()
    for batch in (1, 5):                  # never seen while tracing
        _same(model, result, _rebatch(inputs, batch))


def _rebatch(inputs, batch):
    from torch.utils import _pytree as pytree
    gen = torch.Generator().manual_seed(batch)
    return pytree.tree_map(lambda x: torch.randn((batch, *x.shape[1:]), generator=gen), inputs)


class OptionalContext(nn.Module):
    """``forward(self, x, context=None, *, mask=None)``: callers pass x only."""

    def __init__(self, rows=4):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(3, 3, 3, padding=1) for _ in range(rows))

    def forward(self, x, context=None, *, mask=None):
        out = torch.stack([conv(x[:, :, h]) for h, conv in enumerate(self.convs)], 2)
        if context is not None:
            out = out + context
        if mask is not None:
            out = out * mask
        return out


class KeywordOnly(nn.Module):
    """``forward(self, x, *, scale=2.0)``: a keyword-only option left at its default."""

    def __init__(self, rows=3):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(5, 4) for _ in range(rows))

    def forward(self, x, *, scale=2.0):
        return torch.stack([head(x[:, h]) * scale for h, head in enumerate(self.heads)], 1)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("make,shape", [(OptionalContext, (2, 3, 4, 6)), (KeywordOnly, (2, 3, 5))],
                         ids=["optional-context", "keyword-only"])
def test_unsupplied_defaults_bound_as_constants(make, shape, train):
    model = make().train(train)
    x = torch.randn(*shape)
    result = fxfuse.fuse(model, (x,), benchmark=False)
    assert result.tracer == "symbolic"
    assert _fused(result) == 1 or result.sites[0].lowering == "loop"
    assert any("optional arguments bound" in n for n in result.notes)
    other = fresh_inputs((x,), 5)
    _same(model.train(train), result, other)
    check_grads(model, result.model, other, result.weight_map)


# ------------------------------------------------------------------ specialised graphs

class ScaledShapeBound(nn.Module):
    """A float argument and a loop bound from the shape: export bakes the float in."""

    def __init__(self, rows=3):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(2, 2, 3, padding=1) for _ in range(rows))

    def forward(self, x, scale):
        return torch.stack([self.convs[h](x[:, :, h]) * scale for h in range(x.shape[2])], 2)


def test_export_specialised_value_is_checked_and_never_silently_wrong():
    model = ScaledShapeBound().eval()
    x = torch.randn(2, 2, 3, 7)
    result = fxfuse.fuse(model, (x, 2.0), benchmark=False)
    assert result.tracer == "export" and result.trace_check is not None
    _same(model, result, (torch.randn(4, 2, 3, 7), 2.0))
    other = (torch.randn(4, 2, 3, 7), 3.0)       # a value the graph fixed
    try:
        got = result.model(*other)
    except Exception:  # noqa: BLE001 - refusing is fine, a wrong number is not
        return
    torch.testing.assert_close(got, model(*other), rtol=1e-4, atol=1e-5)


class PerSample(nn.Module):
    """Runs a per-row loop, then a Python loop over the batch: export unrolls it, so the
    graph holds one batch size only, where the model takes any."""

    def __init__(self, rows=3):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(2, 2, 3, padding=1) for _ in range(rows))

    def forward(self, x):
        out = torch.stack([self.convs[h](x[:, :, h]) for h in range(x.shape[2])], 2)
        return torch.stack([out[b] * (b + 1) for b in range(x.shape[0])])


def test_graph_fixed_to_one_batch_says_so():
    model = PerSample().eval()
    x = torch.randn(3, 2, 3, 7)
    traced = fxfuse.trace_model(copy.deepcopy(model), (x,))
    report = check_trace(model, traced, (x,))
    assert report.batch_sizes == (3,)
    assert any("batch size 3 only" in n for n in report.notes)
    assert any(c.name.endswith("batch 3") for c in report.checks)   # fresh inputs, same batch
    # default path (loop left alone): the result says which batch it accepts
    result = fxfuse.fuse(model, (x,), benchmark=False, min_rows=4)
    assert not result.changed and result.batch_sizes == (3,)
    assert "batch sizes accepted: 3" in result.report()
    assert json.loads(json.dumps(result.to_dict()))["trace_check"]["batch_sizes"] == [3]
    _same(model, result, fresh_inputs((x,), 3, seed=11))


def test_trace_mismatch_blames_the_trace():
    model = RowsPlusContext().eval()
    x = torch.randn(2, 2, 3, 7)
    traced = fxfuse.trace_model(copy.deepcopy(model), (x, x))
    with torch.no_grad():                      # a trace that differs from the model
        traced.get_submodule("convs.1").weight.add_(1.0)
    with pytest.raises(fxfuse.TraceError, match="the trace, not the rewrite") as info:
        check_trace(model, traced, (x, x))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ export train/eval

class RowsDropout(nn.Module):
    def __init__(self, rows=4):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(3, 4, 3, padding=1) for _ in range(rows))
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return torch.stack([self.drop(self.convs[h](x[:, :, h])) for h in range(x.shape[2])], 2)


@pytest.mark.parametrize("tracer", ["auto", "export"])
def test_export_train_dropout_fuses(tracer):
    model = RowsDropout().train()
    x = torch.randn(2, 3, 4, 8)
    result = fxfuse.fuse(model, (x,), benchmark=False, lowering="grouped", tracer=tracer)
    assert result.tracer == "export" and _fused(result) == 1
    drops = [m for m in result.model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.training for m in drops)
    result.model.eval()                  # reaches the graph's dropout now
    assert not any(m.training for m in drops)
    _same(model, result, fresh_inputs((x,), 5))
    assert result.verification is not None and any("grad" in c.name
                                                   for c in result.verification.checks)


# ------------------------------------------------------------------ weight norm

class WeightNormRows(nn.Module):
    def __init__(self, rows=3):
        super().__init__()
        self.convs = nn.ModuleList(nn.utils.weight_norm(nn.Conv1d(2, 3, 3, padding=1))
                                   for _ in range(rows))

    def forward(self, x):
        return torch.stack([conv(x[:, :, h]) for h, conv in enumerate(self.convs)], 2)


@pytest.fixture
def _quiet_weight_norm_warning():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


@pytest.mark.usefixtures("_quiet_weight_norm_warning")
def test_old_weight_norm_folded_in_eval():
    model = WeightNormRows().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 2, 3, 7)
    result = fxfuse.fuse(model, (x,), benchmark=False)
    assert _fused(result) == 1 or result.sites[0].lowering == "loop"
    assert any("weight_norm folded" in n for n in result.notes)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert sorted(before) == sorted(model.state_dict())     # the user's model untouched
    _same(model, result, fresh_inputs((x,), 5))


@pytest.mark.usefixtures("_quiet_weight_norm_warning")
def test_old_weight_norm_train_kept_with_reason():
    model = WeightNormRows().train()
    x = torch.randn(2, 2, 3, 7)
    result = fxfuse.fuse(model, (x,), benchmark=False)
    assert not result.changed and len(result.sites) == 1
    assert "parametrizations" in result.sites[0].reason
    assert any("weight_norm in train mode kept" in n for n in result.notes)
    assert sorted(k for k, _ in model.named_parameters())[:2] == ["convs.0.bias",
                                                                   "convs.0.weight_g"]
    other = fresh_inputs((x,), 5)
    xs = [other[0].clone().requires_grad_() for _ in range(2)]
    outs = [model(xs[0]), result.model(xs[1])]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for out in outs:
        out.square().sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-6)
    ref = {k: p.grad for k, p in model.named_parameters()}
    got = result.weight_map.to_original({k: p.grad for k, p in
                                         result.model.named_parameters()}, strict=False)
    assert sorted(got) == sorted(ref)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)


def test_old_weight_norm_inplace_is_one_clear_error():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = WeightNormRows().eval()
    with pytest.raises(fxfuse.ConfigError, match="weight_norm") as info:
        fxfuse.fuse(model, (torch.randn(2, 2, 3, 7),), benchmark=False, inplace=True)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ the third route

class LenShapeParametersChild(nn.Module):
    """``len(x.shape)`` defeats symbolic_trace; a child named ``parameters`` (shadowing the
    method) defeats torch.export."""

    def __init__(self, rows=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Conv1d(3, 4, 3) for _ in range(rows))
        self.parameters = nn.Linear(6, 6)      # registered as a child, as real code does

    def forward(self, x):
        if len(x.shape) == 3:
            x = x.unsqueeze(0)
        y = torch.stack([conv(x[:, :, h]) for h, conv in enumerate(self.layers)], 2)
        return {"y": self._modules["parameters"](F.relu(y))}


@pytest.mark.parametrize("train", [False, True])
def test_real_tensor_route(train):
    model = LenShapeParametersChild().train(train)
    x = torch.randn(2, 3, 3, 8)
    with pytest.raises(fxfuse.TraceError):
        fxfuse.trace_model(copy.deepcopy(model), (x,), tracer="export")
    result = fxfuse.fuse(model, (x,), benchmark=False)
    assert result.tracer == "realtensor"
    assert _fused(result) == 1 or result.sites[0].lowering == "loop"
    assert any("make_fx" in n for n in result.notes)
    assert any("parameters.weight -> parameters_.weight" in n for n in result.notes)
    sizes = result.batch_sizes
    other = fresh_inputs((x,), 2 if sizes else 5, seed=9)
    _same(model, result, other)
    check_grads(model, result.model, other, result.weight_map)
    restored = result.weight_map.to_original(result.model.state_dict())
    assert sorted(restored) == sorted(model.state_dict())


class ValueBranchShapeBound(LenShapeParametersChild):
    def forward(self, x):
        if x.sum() > 0:                       # a value branch: no route may bake it in
            x = -x
        return super().forward(x)


def test_no_route_is_one_clear_line():
    with pytest.raises(fxfuse.TraceError) as info:
        fxfuse.fuse(ValueBranchShapeBound(), (torch.randn(2, 3, 3, 8),), benchmark=False)
    message = str(info.value)
    assert "\n" not in message and "ValueBranchShapeBound" in message
    assert "control flow" in message
    assert "named like an nn.Module method" in message and "tensor values" in message


# ------------------------------------------------------------------ nothing rewritten

class AttentionNoLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_nothing_rewritten_returns_symbolic_trace():
    model = AttentionNoLoop().eval()
    x = torch.randn(2, 5, 8)
    result = fxfuse.fuse(model, (x,), benchmark=False, tracer="export")
    assert not result.changed and result.tracer == "symbolic"
    calls = [n.target for n in result.model.graph.nodes if n.op == "call_module"]
    assert calls == ["attn"]                      # the module (and its fast path) kept
    assert any("symbolic trace" in n for n in result.notes)
    _same(model, result, (torch.randn(3, 5, 8),))


def test_trace_check_catches_a_graph_that_reads_one_input_for_two():
    """What the check exists for: a graph traced on one tensor passed for two arguments
    that reads one input for both (what torch.export did with aliased inputs) agrees on
    the example inputs and differs on distinct ones; the error blames the trace."""
    model = CrossAttend().eval()
    x = torch.randn(2, 5, 8)
    graph = torch.fx.symbolic_trace(copy.deepcopy(model))
    query, key = [n for n in graph.graph.nodes if n.op == "placeholder"]
    key.replace_all_uses_with(query)
    graph.recompile()
    with pytest.raises(fxfuse.TraceError, match="the trace, not the rewrite") as info:
        check_trace(model, graph, (x, x))
    assert "fresh inputs" in str(info.value) and "\n" not in str(info.value)
