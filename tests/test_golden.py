"""Golden before/after graphs, one per rewrite: the model as written (``before``), and
the sequence of calls its fused graph must be (``expected``), the way TVM tests passes.

A change to what the rewriter emits shows here as a readable diff of call sequences
(methods by name, functions by name, modules by type; ``get_attr`` and placeholders are
left out). The numbers of every case are checked elsewhere; here they are checked once
more on a fresh batch so a golden graph can never be a wrong one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import fxfuse
from zoo import spellings, whole
from helpers import call_sequence
from zoo import heads, norms, towers


@dataclass(frozen=True)
class Golden:
    before: Callable[[], nn.Module]
    shape: tuple[int, ...]
    lowering: str            # asked for
    label: str               # what the site reports
    expected: tuple[str, ...]


LAYOUT_OUT = ("unflatten", "permute", "contiguous")   # (N, H*C, L) back to the loop's layout

GOLDEN = {
    "grouped-conv": Golden(spellings.Seed, (2, 3, 4, 8), "grouped", "grouped",
                           ("permute", "flatten", "Conv1d") + LAYOUT_OUT),
    "grouped2d-conv": Golden(spellings.Seed, (2, 3, 4, 8), "grouped2d", "grouped2d",
                             ("permute", "flatten", "unsqueeze", "permute", "Conv2d", "squeeze")
                             + LAYOUT_OUT),
    "bmm-linear-heads": Golden(lambda: heads.Heads(v=3, length=8, p=4), (2, 3, 8), "grouped",
                               "bmm", ("transpose", "transpose", "unsqueeze", "baddbmm",
                                       "transpose", "contiguous")),
    "batched-shared-conv": Golden(whole.Shared, (2, 3, 4, 8), "grouped", "batched",
                                  ("permute", "flatten", "Conv1d") + LAYOUT_OUT),
    "dense-sum": Golden(towers.Summed, (2, 3, 4, 16), "grouped", "dense",
                        ("permute", "flatten", "Conv1d", "sum", "unsqueeze", "add",
                         "contiguous")),
    "tower-with-batchnorm": Golden(lambda: towers.Tower(h=3), (2, 3, 3, 16), "grouped",
                                   "grouped", ("permute", "flatten", "Conv1d", "BatchNorm1d",
                                               "ReLU", "Dropout", "Conv1d") + LAYOUT_OUT),
    "layernorm-heads": Golden(lambda: norms.LayerNormHeads(v=3, d=8, p=4), (2, 3, 8),
                              "grouped", "bmm",
                              ("transpose", "transpose", "unsqueeze", "baddbmm", "transpose",
                               "layer_norm", "view", "view", "addcmul", "GELU", "contiguous")),
    "layernorm-tower": Golden(lambda: norms.LayerNormTower(h=3), (2, 3, 3, 16), "grouped",
                              "grouped", ("permute", "flatten", "Conv1d", "unflatten",
                                          "layer_norm", "view", "view", "addcmul", "flatten",
                                          "relu", "Conv1d") + LAYOUT_OUT),
    # vmap of one row over the stacked weights, traced into ATen: the batching rules give
    # one grouped convolution (groups = rows) and one bmm; the source is read as a view
    # (one permute), the batch size from the input (size), the join is one movedim.
    "vmap-conv": Golden(spellings.Seed, (2, 3, 4, 8), "vmap", "vmap",
                        ("size", "permute.default", "clone.default", "_unsafe_view.default",
                         "permute.default", "view.default", "convolution.default",
                         "view.default", "permute.default", "unsqueeze.default",
                         "view.default", "add.Tensor", "unsqueeze.default", "movedim",
                         "flatten", "contiguous")),
    "vmap-linear-heads": Golden(lambda: heads.Heads(v=3, length=8, p=4), (2, 3, 8), "vmap",
                                "vmap", ("size", "transpose.int", "permute.default",
                                         "expand.default", "view.default", "expand.default",
                                         "view.default", "bmm.default", "_unsafe_view.default",
                                         "mul.Scalar", "view.default", "add.Tensor",
                                         "movedim", "contiguous")),
}


@pytest.mark.parametrize("case", GOLDEN.values(), ids=GOLDEN.keys())
def test_golden_graph(case):
    torch.manual_seed(0)
    model = case.before().eval()
    x = torch.randn(*case.shape)
    before = call_sequence(fxfuse.trace_model(model, (x,)))
    result = fxfuse.fuse(model, (x,), lowering=case.lowering, benchmark=False)
    assert [s.lowering for s in result.sites] == [case.label], [s.reason for s in result.sites]
    assert tuple(call_sequence(result.model)) == case.expected, result.model.code
    if case.label == "vmap":                         # H layer calls became one ATen call
        layers = [c for c in before if c in ("Conv1d", "Linear")]
        assert len(layers) > 1 and sum(c.split(".")[0] in ("convolution", "bmm")
                                       for c in case.expected) == 1
    else:
        assert len(before) > len(case.expected)      # one call per row became one in all
    other = torch.randn(case.shape[0] + 1, *case.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(result.model(other), model(other), rtol=1e-4, atol=1e-5)


def test_golden_vmap_embedding_rows():
    """Per-column embeddings: one lookup into the stacked tables with offset indices
    (``arange`` of the row starts added), then one bmm for the rows' Linears."""
    from zoo.rowgen import RowModel
    torch.manual_seed(0)
    model = RowModel("idx", ["linear"], 3, "index", "cat").eval()
    x = model.example()
    result = fxfuse.fuse(model, (x,), lowering="vmap", benchmark=False)
    calls = call_sequence(result.model)
    assert calls.count("embedding.default") == 1 and calls.count("bmm.default") == 1, calls
    assert "arange.start_step" in calls and "getitem" not in calls and "stack" not in calls
    other = model.example(7)
    with torch.no_grad():
        torch.testing.assert_close(result.model(other), model(other))


def test_golden_grouped_conv_code():
    """The whole ``forward`` of the seed, as text: one grouped conv, groups = rows."""
    torch.manual_seed(0)
    model = spellings.Seed()
    result = fxfuse.fuse(model, (model.example(),), lowering="grouped", benchmark=False)
    conv = result.model.get_submodule("layers_fused")
    assert (conv.in_channels, conv.out_channels, conv.groups) == (4 * 3, 4 * 5, 4)
    body = [line.strip() for line in result.model.code.strip().splitlines()[1:]]
    assert body == [
        "permute = x.permute(0, 2, 1, 3);  x = None",
        "flatten = permute.flatten(1, 2);  permute = None",
        "layers_fused = self.layers_fused(flatten);  flatten = None",
        "unflatten = layers_fused.unflatten(1, (4, 5));  layers_fused = None",
        "permute_1 = unflatten.permute(0, 2, 1, 3);  unflatten = None",
        "contiguous = permute_1.contiguous();  permute_1 = None",
        "return contiguous",
    ], result.model.code
