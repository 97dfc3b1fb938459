"""Conv rows as one batched matmul over unfolded windows (``lowering="im2col"``).

The fused weights live in the same grouped ``Conv1d`` module the ``grouped`` lowering
makes (so the weight map, and a loop applied twice, are the same), but the module is not
called: its weight is read as (G, C'/g, C/g * k) and multiplied with the input's windows,
unfolded once for all rows::

    cols = F.unfold(x.unsqueeze(2), (1, k), dilation=(1, d), padding=(0, p), stride=(1, s))
    out = weight.view(G, C'g, Cg * k) @ cols.unflatten(1, (G, Cg * k)) + bias.view(G, C'g, 1)

``'same'``, ``'valid'`` and padding modes other than zeros are padded with ``F.pad`` first,
as ``nn.Conv1d`` itself does. Rows whose kernel sizes differ are not done this way.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ...graphs.build import fused_module
from ..kernels import input_sides
from ..sites import ConvSpec
from .base import Lane, RowOp

LOWERING = "im2col"
PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
             "circular": "circular"}


def emit_im2col(lane: Lane, ops: list[RowOp]) -> None:
    """The fused step for conv rows with equal settings, as unfold + batched matmul."""
    spec, g, graph = ops[0].key, len(ops), lane.graph
    name, entries = fused_module(lane.gm, ops, "conv1d", lane.prefix, lambda: nn.Conv1d(
        g * spec.in_channels, g * spec.out_channels, spec.kernel_size, stride=spec.stride,
        padding=spec.padding, dilation=spec.dilation, groups=g * spec.groups, bias=spec.bias,
        padding_mode=spec.padding_mode, dtype=spec.dtype, device=spec.device
    ).train(lane.gm.training))
    groups = g * spec.groups
    c_in, c_out = spec.in_channels // spec.groups, spec.out_channels // spec.groups
    x = lane.flat()
    left, right = input_sides(spec)
    pad = 0
    if left == right and spec.padding_mode == "zeros":
        pad = left
    elif left or right:
        x = graph.call_function(F.pad, (x, (left, right)),
                                {"mode": PAD_MODES[spec.padding_mode]})
    cols = graph.call_function(F.unfold, (graph.call_method("unsqueeze", (x, 2)),
                                          (1, spec.kernel_size)),
                               {"dilation": (1, spec.dilation), "padding": (0, pad),
                                "stride": (1, spec.stride)})
    cols = graph.call_method("unflatten", (cols, 1, (groups, c_in * spec.kernel_size)))
    weight = graph.call_method("view", (graph.get_attr(f"{name}.weight"),
                                        groups, c_out, c_in * spec.kernel_size))
    out = graph.call_function(torch.matmul, (weight, cols))     # (N, G, C'g, L')
    if spec.bias:
        bias = graph.call_method("view", (graph.get_attr(f"{name}.bias"), groups, c_out, 1))
        out = graph.call_function(operator.add, (out, bias))
    lane.node = graph.call_method("flatten", (out, 1, 2))
    lane.channels = spec.out_channels
    lane.entries += entries
