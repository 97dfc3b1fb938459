"""Real-code loops: preallocated output buffers as people allocate them, and per-feature
layers on the last axis. Default path and ``lowering="grouped"``, eval and train, checked
at another batch size (outputs, input and parameter gradients) against the original."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxfuse
from conftest import AUTO_ROUNDS, check_grads, check_outputs, fresh_inputs
from fxfuse.trace.export import FixedModeError
from zoo.realcode import (CudaBuffer, DecompLinear, GroupedFeatureLinear, NumericEmbedding,
                           SliceEmbedding, ZerosLikeConv)

HEAVY = {"convolution", "mm", "addmm", "bmm", "baddbmm", "addbmm"}


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket.__name__ in HEAVY
        return func(*args, **(kwargs or {}))


def heavy_calls(model: nn.Module, inputs: tuple) -> int:
    """Conv/matmul kernels one forward runs."""
    with torch.no_grad(), _Count() as count:
        model(*inputs)
    return count.n


def fuse_and_check(model: nn.Module, inputs: tuple, sites: int, calls_after: int,
                   lowering: str | None, train: bool) -> fxfuse.FuseResult:
    """Fuse; assert the sites fused, the per-row calls gone (grouped, or auto when it
    rewrote every site), and the numbers at another batch size, gradients in train mode."""
    model.train(train)
    options = {"lowering": lowering} if lowering else {"auto_rounds": AUTO_ROUNDS}
    result = fxfuse.fuse(model, inputs, benchmark=False, **options)
    summary = "; ".join(f"{s.name}: {s.reason or s.lowering}" for s in result.sites)
    assert len(result.sites) == sites and all(s.fusable for s in result.sites), summary
    assert all(s.fused for s in result.sites) or lowering is None, summary
    other = tuple(o.to(x.device) for o, x in
                  zip(fresh_inputs(inputs, inputs[0].shape[0] + 3), inputs))
    if all(s.fused for s in result.sites):
        result.model.eval()
        assert heavy_calls(result.model, other) == calls_after, result.model.code
    check_outputs(model, result.model, other)
    if train:
        check_grads(model, result.model, other, result.weight_map)
    result.model.train(train)          # the returned model switches modes like any module
    return result


# ----------------------------------------------------------------- 1. buffers

class FilterBankToBuffers(nn.Module):
    """Two buffers from ``torch.zeros(..., device=x.device)`` / ``.to(x)``, filled in one
    loop by per-channel convs, read after the loop through permuted views."""

    def __init__(self, n=4, k=3):
        super().__init__()
        self.n = n
        self.low = nn.ModuleList(nn.Conv1d(1, 2, k, padding=1) for _ in range(n))
        self.high = nn.ModuleList(nn.Conv1d(1, 2, k, padding=1, bias=False) for _ in range(n))

    def forward(self, x):   # (B, n, T)
        B, _, T = x.shape
        lo = torch.zeros(B, self.n, 2, T, device=x.device)
        hi = torch.zeros([B, self.n, 2, T]).to(x).float()
        for c in range(self.n):
            lo[:, c] = self.low[c](x[:, c:c + 1])
            hi[:, c, :, :] = self.high[c](x[:, c].unsqueeze(1))
        return lo.permute(0, 2, 1, 3) - 0.5 * hi.permute(0, 2, 1, 3)


class EmptyLikeHeads(nn.Module):
    """``torch.empty_like`` buffer, ``.to(dtype)``, per-variable Linear heads, dropout after."""

    def __init__(self, n=3, d=6, p=0.0):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.drop = nn.Dropout(p)

    def forward(self, x):   # (B, n, d)
        out = torch.empty_like(x).to(torch.float32)
        for i, head in enumerate(self.heads):
            out[:, i, :] = head(x[:, i, :])
        return self.drop(F.gelu(out)).sum(-1)


BUFFER_CASES = [
    ("zeros(...).to(device)", lambda: DecompLinear(alloc="zeros_to"), (4, 24, 5), 2, 2),
    ("new_zeros", lambda: DecompLinear(alloc="new_zeros"), (4, 24, 5), 2, 2),
    ("empty().type_as(x)", lambda: DecompLinear(alloc="empty_type_as"), (4, 24, 5), 2, 2),
    ("zeros().to(dtype)", lambda: DecompLinear(alloc="zeros_to_dtype"), (4, 24, 5), 2, 2),
    ("zeros_like", ZerosLikeConv, (4, 6, 20), 1, 1),
    ("two buffers read through views", FilterBankToBuffers, (3, 4, 12), 2, 2),
    ("empty_like + .to(dtype) heads", EmptyLikeHeads, (5, 3, 6), 1, 1),
]


@pytest.mark.parametrize("lowering", [None, "grouped"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,factory,shape,sites,calls", BUFFER_CASES,
                         ids=[c[0] for c in BUFFER_CASES])
def test_buffers_fuse(name, factory, shape, sites, calls, train, lowering):
    fuse_and_check(factory(), (torch.randn(shape),), sites, calls, lowering, train)


def test_buffer_read_between_writes_is_left_alone():
    class Carried(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            out = torch.zeros(x.shape, dtype=x.dtype).to(x.device)
            for i, head in enumerate(self.heads):
                out[:, i] = head(x[:, i] + out[:, i - 1])
            return out

    model, x = Carried().eval(), torch.randn(2, 3, 4)
    result = fxfuse.fuse(model, (x,), benchmark=False)
    assert not result.changed
    assert result.sites and all(s.reason for s in result.sites)
    torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=0)


def test_exported_model_switches_modes():
    """A graph traced through torch.export (buffer writes) follows train()/eval():
    its dropout obeys, and eval() after train() gives the eval-mode numbers."""
    model, x = EmptyLikeHeads(p=0.2).train(), torch.randn(4, 3, 6)
    result = fxfuse.fuse(model, (x,), benchmark=False, lowering="grouped")
    assert result.tracer == "export"
    fused = result.model
    assert fused.eval() is fused and not fused.training
    assert all(not m.training for m in fused.modules())
    torch.testing.assert_close(fused(x), model.eval()(x))
    fused.train()
    assert all(m.training for m in fused.modules())


def test_exported_batch_norm_refuses_the_other_mode_clearly():
    class BNBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv1d(2, 2, 3, padding=1) for _ in range(3))
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x):   # (B, 2, 3, T)
            out = x.new_zeros(x.shape)
            for h, conv in enumerate(self.convs):
                out[:, :, h] = conv(x[:, :, h])
            return self.bn(out.sum(2))

    model, x = BNBuffer().eval(), torch.randn(2, 2, 3, 8)
    result = fxfuse.fuse(model, (x,), benchmark=False, lowering="grouped")
    assert result.tracer == "export" and result.changed
    result.model.eval()                       # the traced mode is accepted
    with pytest.raises(FixedModeError, match="eval mode only"):
        result.model.train()
    assert isinstance(FixedModeError("x"), fxfuse.FxFuseError)


# ----------------------------------------------------------------- 3. last-axis features

class SplitFeatureHeads(nn.Module):
    """``x.split(k, -1)`` of a (B, T, G*k) input, a Linear(k, d) + ReLU per block, cat."""

    def __init__(self, groups=3, k=2, d=4):
        super().__init__()
        self.k = k
        self.lins = nn.ModuleList(nn.Linear(k, d) for _ in range(groups))

    def forward(self, x):
        parts = x.split(self.k, dim=-1)
        return torch.cat([F.relu(lin(p)) for p, lin in zip(parts, self.lins)], dim=-1)


class TabularEmbedding(nn.Module):
    """Continuous columns of a (B, F) or (B, T, F) table, one Linear(1, d) each, by
    name in a dict, stacked in key order on the last dim."""

    def __init__(self, cols=("age", "fare", "fam", "deck"), d=3, narrow=False):
        super().__init__()
        self.cols = list(cols)
        self.narrow = narrow
        self.emb = nn.ModuleDict({c: nn.Linear(1, d) for c in self.cols})

    def forward(self, x):
        feats = {}
        for i, col in enumerate(self.cols):
            xi = x.narrow(-1, i, 1) if self.narrow else x[..., i].unsqueeze(-1)
            feats[col] = self.emb[col](xi)
        return torch.stack([feats[c] for c in self.cols], dim=-1)


FEATURE_CASES = [
    ("Linear(1,d) x[..., i].unsqueeze(-1), stack -2", lambda: NumericEmbedding(), (4, 7, 5), 0),
    ("Linear(1,d), stack -1", lambda: NumericEmbedding(stack_dim=-1), (4, 7, 5), 0),
    ("x[:, :, i:i+1], ModuleDict, dict", SliceEmbedding, (4, 7, 4), 0),
    ("Linear(k,d) blocks, cat -1", GroupedFeatureLinear, (4, 7, 12), 1),
    ("split + Linear(k,d) + relu, cat -1", SplitFeatureHeads, (3, 5, 6), 1),
    ("dict of columns, (B, F)", TabularEmbedding, (6, 4), 0),
    ("dict of columns, narrow, (B, T, F)", lambda: TabularEmbedding(narrow=True), (3, 5, 4), 0),
]


@pytest.mark.parametrize("lowering", [None, "grouped"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,factory,shape,calls", FEATURE_CASES,
                         ids=[c[0] for c in FEATURE_CASES])
def test_last_axis_features_fuse(name, factory, shape, calls, train, lowering):
    fuse_and_check(factory(), (torch.randn(shape),), 1, calls, lowering, train)


def test_last_axis_rows_of_another_axis_still_read_as_rows():
    """Linear rows that are whole rows of dim 2 of a (B, T, H, L) input keep the plain
    row layout (the last-axis reading is only a fallback)."""
    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(4, 3) for _ in range(3))

        def forward(self, x):
            return torch.stack([h(x[:, :, i]) for i, h in enumerate(self.heads)], 2)

    result = fuse_and_check(Rows(), (torch.randn(2, 5, 3, 4),), 1, 1, "grouped", False)
    assert not result.sites[0].input_plan.feature_last


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_buffer_allocated_with_cuda_fuses(train):
    model = CudaBuffer().cuda()
    fuse_and_check(model, (torch.randn(3, 4, 6, device="cuda"),), 1, 1, "grouped", train)
