"""Issue 11, constructs 6 and 7: rows that differ only in kernel size, per-row pooling,
per-row raw-parameter layers; on the real-code models (tests/zoo/realcode.py) and on
variants written in the same style. Default path first, then ``lowering="grouped"``,
eval and train, checked at another batch size (conftest.check)."""
from __future__ import annotations

import json
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from fxfuse.weightmap import WeightMap
from fxfuse.errors import ConfigError
from fxfuse.match.kinds.rawparam import attr_row
from helpers import assert_map_round_trip, rewrites_win
from conftest import assert_left_alone, check, check_counts, check_grads, check_outputs, \
    fresh_inputs, set_mode
from zoo.realcode import InceptionBranches, MultiScaleRows, PooledTowers, RawParamHeads

MODES = [False, True]


def heavy_calls(gm) -> int:
    """Conv / matmul calls in a graph (modules and functions)."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            n += isinstance(gm.get_submodule(str(node.target)), (nn.Conv1d, nn.Conv2d, nn.Linear))
        elif node.op == "call_function":
            name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
            n += name in ("convolution", "linear", "matmul", "einsum", "bmm", "mm", "addmm")
            n += node.target in (F.conv1d, F.conv2d, F.linear, torch.matmul, operator.matmul,
                                 torch.bmm,
                                 torch.einsum, torch.baddbmm)
    return n


def check_rows(model: nn.Module, x: tuple, lowering: str | None) -> fxfuse.FuseResult:
    """``conftest.check`` for sites that are not convs (no ConvSpec, no fused conv
    module): one site fused, outputs at another batch size and train-mode gradients
    (mapped back through the weight map) match the original."""
    result = fxfuse.fuse(model, x, benchmark=False, lowering=lowering or "auto")
    assert [s.fused for s in result.sites] == [True], [s.reason for s in result.sites]
    result.model.graph.lint()
    other = fresh_inputs(x, x[0].shape[0] + 2)
    check_outputs(model, result.model, other)
    check_grads(model, result.model, other, result.weight_map)
    return result


# ------------------------------------------------------------------ kernel sizes

class MultiScaleSlices(nn.Module):
    """A ModuleDict of convs with explicit ``k // 2`` padding, no bias, on x[:, i]."""

    def __init__(self, C=3, kernels=(5, 3, 7)):
        super().__init__()
        self.convs = nn.ModuleDict({f"k{k}": nn.Conv1d(C, 4, k, padding=k // 2, bias=False)
                                    for k in kernels})

    def forward(self, x):  # (B, H, C, L)
        outs = []
        for i, name in enumerate(self.convs):
            outs.append(self.convs[name](x[:, i]))
        return torch.stack(outs, dim=1).flatten(1, 2)


class DilatedScales(nn.Module):
    """Dilated 'same' convs with an even kernel among them, then a shared activation."""

    def __init__(self, C=2, kernels=(3, 7, 5, 3), dilation=2):
        super().__init__()
        self.branch = nn.ModuleList([nn.Conv1d(C, C, k, dilation=dilation, padding="same")
                                     for k in kernels])
        self.act = nn.GELU()

    def forward(self, x):  # (B, C, H, L)
        ys = [self.act(conv(x[:, :, h, :])) for h, conv in enumerate(self.branch)]
        return torch.stack(ys, dim=2)


def EvenScales():
    """Even and odd 'same' kernels (torch pads an even one more on the right)."""
    return DilatedScales(kernels=(2, 4, 3, 4), dilation=1)


KERNEL_CASES = [(MultiScaleRows, (2, 4, 4, 16)), (MultiScaleSlices, (2, 3, 3, 12)),
                (DilatedScales, (2, 2, 4, 12)), (EvenScales, (2, 2, 4, 12))]


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("factory,shape", KERNEL_CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_kernel_sizes_pad_to_largest(factory, shape, train):
    torch.manual_seed(0)
    model = set_mode(factory(), train)
    x = (torch.randn(shape),)
    before = heavy_calls(fxfuse.trace_model(model, x))
    for lowering in (None, "grouped"):
        if train:   # the fused conv reads weight * mask: a function call, not the module
            result = fxfuse.fuse(model, x, benchmark=False, lowering=lowering or "auto")
            check_counts(result, 1, 0, lowering or "auto")
            other = fresh_inputs(x, shape[0] + 2)
            check_outputs(model, result.model, other)
            check_grads(model, result.model, other, result.weight_map)
        else:
            result = check(model, x, 1, lowering=lowering)
        site = result.sites[0]
        assert any("zero-padded" in note for note in site.notes), site.notes
        assert heavy_calls(result.model) == 1 < before
        assert_map_round_trip(model, result)
    assert any(e.op == "pad" for e in result.weight_map.entries)


def test_padded_taps_stay_zero_in_training():
    torch.manual_seed(0)
    model = MultiScaleRows().train()
    result = fxfuse.fuse(model, (torch.randn(2, 4, 4, 16),), benchmark=False,
                         lowering="grouped")
    fused = result.model
    opt = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        fused(torch.randn(3, 4, 4, 16)).square().sum().backward()
        opt.step()
    entry = next(e for e in result.weight_map.entries if e.op == "pad")
    weight = fused.state_dict()[entry.fused_key]
    rows = torch.split(weight, weight.shape[0] // len(entry.parts))
    for row, (offset, size) in zip(rows, entry.window):
        assert torch.all(row[..., :offset] == 0) and torch.all(row[..., offset + size:] == 0)


class StridedMisaligned(nn.Module):
    """Stride 2, k3 p1 and k4 p1: same output length, but the taps do not line up."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(2, 2, 3, stride=2, padding=1),
                                    nn.Conv1d(2, 2, 4, stride=2, padding=1)])

    def forward(self, x):
        return torch.stack([c(x[:, :, i]) for i, c in enumerate(self.convs)], 2)


class ReflectScales(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(2, 2, k, padding=k // 2, padding_mode="reflect")
                                    for k in (3, 5)])

    def forward(self, x):
        return torch.stack([c(x[:, :, i]) for i, c in enumerate(self.convs)], 2)


def test_misaligned_kernels_refused_with_the_reason():
    assert_left_alone(StridedMisaligned(), (torch.randn(2, 2, 2, 16),),
                      "kernel_size 3 vs 4", "does not line up")
    assert_left_alone(ReflectScales(), (torch.randn(2, 2, 2, 16),), "kernel_size", "reflect")
    # dilation 2: k2 'same' pads 1 left, k5 pads 4: 3 zeros are not a whole tap apart
    assert_left_alone(DilatedScales(kernels=(2, 5)), (torch.randn(2, 2, 2, 16),),
                      "row 0 (k2", "does not line up")


def test_pad_entry_validation():
    good = {"format": "fxfuse-weight-map/1", "entries": [
        {"fused_key": "f.weight", "parts": ["a", "b"], "dim": 0, "unsqueeze": None,
         "op": "pad", "window": [[1, 3], [0, 5]]}]}
    wm = WeightMap.from_json(json.dumps(good))
    a, b = torch.randn(2, 2, 3), torch.randn(2, 2, 5)
    fused = wm.to_fused({"a": a, "b": b})["f.weight"]
    assert fused.shape == (4, 2, 5)
    back = wm.to_original({"f.weight": fused})
    assert torch.equal(back["a"], a) and torch.equal(back["b"], b)
    for bad in ([[1, 3]], [[1, 3], [0, -5]], None, [[1, 3], "x"]):
        good["entries"][0]["window"] = bad
        with pytest.raises(ConfigError, match="window"):
            WeightMap.from_json(json.dumps(good))
    good["entries"][0].update(op="cat", window=[[0, 1], [0, 1]])
    with pytest.raises(ConfigError, match="window"):
        WeightMap.from_json(json.dumps(good))


# ------------------------------------------------------------------ pooling in towers

class FunctionalPoolTowers(nn.Module):
    """Pools written as functions inside the loop, the row picked with ``select``."""

    def __init__(self, H=3, C=2):
        super().__init__()
        self.c1 = nn.ModuleList([nn.Conv1d(C, 4, 3, padding=1) for _ in range(H)])
        self.c2 = nn.ModuleList([nn.Conv1d(4, 4, 3) for _ in range(H)])

    def forward(self, x):  # (B, C, H, L)
        feats = []
        for h in range(len(self.c1)):
            y = F.relu(self.c1[h](x.select(2, h)))
            y = F.max_pool1d(y, kernel_size=2, stride=2)
            y = F.avg_pool1d(self.c2[h](y), 2, ceil_mode=True)
            feats.append(F.adaptive_max_pool1d(y, 2))
        return torch.cat(feats, dim=1)


class IndexPoolTowers(FunctionalPoolTowers):
    """A pool that also returns its indices: a tuple per row, not fused."""

    def forward(self, x):
        feats = []
        for h in range(len(self.c1)):
            y, _ = F.max_pool1d(self.c1[h](x[:, :, h]), 2, return_indices=True)
            feats.append(y)
        return torch.stack(feats, 1)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("factory,shape", [(PooledTowers, (2, 3, 4, 16)),
                                           (FunctionalPoolTowers, (2, 2, 3, 17))],
                         ids=["modules", "functions"])
def test_pools_apply_once_on_the_grouped_layout(factory, shape, train):
    torch.manual_seed(0)
    model = set_mode(factory(), train)
    x = (torch.randn(shape),)
    before = heavy_calls(fxfuse.trace_model(model, x))
    for lowering in (None, "grouped"):
        result = check(model, x, 1, lowering=lowering)
        assert heavy_calls(result.model) == 2 < before
        assert any("pool" in step for step in result.sites[0].steps), result.sites[0].steps
        assert_map_round_trip(model, result)


def test_pool_returning_indices_is_not_a_row_op():
    result = fxfuse.fuse(IndexPoolTowers(), (torch.randn(2, 2, 3, 16),), benchmark=False)
    assert not any(s.fused for s in result.sites)


# ------------------------------------------------------------------ raw-parameter layers

class EinsumHeads(nn.Module):
    """``torch.einsum`` with a per-row weight on (B, T, n, d) rows, a registered buffer
    scale; rows taken from ``unbind``."""

    def __init__(self, n=3, d_in=4, d_out=5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, d_in, d_out) * 0.3)
        self.bias = nn.Parameter(torch.randn(n, d_out) * 0.1)

    def forward(self, x):  # (B, T, n, d_in)
        outs = [torch.einsum("btd,de->bte", xi, self.weight[i]) + self.bias[i]
                for i, xi in enumerate(x.unbind(2))]
        return torch.stack(outs, dim=2)


class StackedFLinear(nn.Module):
    """``F.linear`` on rows of one stacked (n, out, in) weight, rows in reverse order,
    no bias; a ReLU after each."""

    def __init__(self, n=4, d_in=6, d_out=3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, d_out, d_in) * 0.3)
        self.n = n

    def forward(self, x):  # (B, n, d_in)
        outs = []
        for i in range(self.n):
            outs.append(torch.relu(F.linear(x[:, i, :], self.w[self.n - 1 - i])))
        return torch.cat(outs, dim=-1)


RAW_CASES = [(RawParamHeads, (2, 4, 6)), (EinsumHeads, (2, 5, 3, 4)),
             (StackedFLinear, (2, 4, 6))]


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("factory,shape", RAW_CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_raw_parameter_rows_one_batched_matmul(factory, shape, train, monkeypatch):
    rewrites_win(monkeypatch)          # the default path's choice must not be the machine's
    torch.manual_seed(0)
    model = set_mode(factory(), train)
    x = (torch.randn(shape),)
    traced = fxfuse.trace_model(model, x)
    before = heavy_calls(traced)
    for lowering in (None, "grouped"):
        result = check_rows(model, x, lowering)
        assert heavy_calls(result.model) == 1 < before, result.model.code
        # the fused graph reads the model's own stacked parameters: nothing copied
        assert sorted(result.model.state_dict()) == sorted(model.state_dict())
        assert not result.weight_map.entries
        assert_map_round_trip(model, result)
        assert not any(n.op == "call_function" and n.target is operator.getitem and n.args[0].op == "get_attr" and isinstance(n.args[1], int)
                       for n in result.model.graph.nodes), result.model.code


# ------------------------------------------------------------------ shared-input branches

class MixedKernelBlock(nn.Module):
    """Branches on one input with their own kernel sizes and biases, summed into a
    dict output after a cat (written as in mixed-kernel blocks)."""

    def __init__(self, C=3, out=2, kernels=(1, 3, 5, 7)):
        super().__init__()
        self.branches = nn.ModuleList()
        for k in kernels:
            self.branches.append(nn.Conv1d(C, out, kernel_size=k, padding=(k - 1) // 2))

    def forward(self, x):
        feats = torch.cat([branch(x) for branch in self.branches], 1)
        return {"features": F.relu(feats), "mean": feats.mean(-1)}


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("factory,shape", [(InceptionBranches, (2, 4, 50)),
                                           (MixedKernelBlock, (2, 3, 20))],
                         ids=["inception", "mixed-kernels"])
def test_shared_input_branches_one_conv(factory, shape, train):
    torch.manual_seed(0)
    model = set_mode(factory(), train)
    x = (torch.randn(shape),)
    before = heavy_calls(fxfuse.trace_model(model, x))
    branches = len(factory().convs if hasattr(factory(), "convs") else factory().branches)
    for lowering in (None, "grouped"):
        result = check_rows(model, x, lowering)
        assert any("zero-padded" in note for note in result.sites[0].notes)
        assert heavy_calls(result.model) == before - branches + 1, result.model.code
        assert_map_round_trip(model, result)
