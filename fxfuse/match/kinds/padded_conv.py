"""Conv rows that differ only in kernel size: one grouped conv over zero-padded kernels.

The matcher (:mod:`fxfuse.match.kernels`) checks that padding each row's kernel to the
largest, at its offset, computes the row exactly. Here the fused conv is made with the
padded kernels concatenated; its weight-map entry is a ``"pad"`` entry, so mapping back
slices each row's kernel out bit for bit. In train mode the padding taps stay zero: the
conv reads ``weight * mask`` (a non-persistent buffer), so they get no gradient and an
optimiser step leaves them at zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...graphs.build import free_name
from ...weightmap import WeightEntry
from ..kernels import KernelPlan, kernel_plan
from ..params import get_tensor
from ..sites import ConvSpec
from .base import Lane, RowOp

MASK = "fxfuse_pad_mask"


def emit_padded(lane: Lane, ops: list[RowOp]) -> None:
    """The fused step for conv rows whose kernels differ (checked to line up)."""
    plan = kernel_plan([op.key for op in ops])
    if isinstance(plan, str):           # the matcher refused such rows already
        raise ValueError(plan)
    spec, g, graph, gm = ops[plan.target].key, len(ops), lane.graph, lane.gm
    two_d = lane.lowering == "grouped2d"
    conv = _padded_conv(spec, plan, g, two_d)
    conv.train(gm.training)
    name = free_name(gm, lane.prefix)
    weights = [get_tensor(gm, op.param("weight")).detach() for op in ops]
    entries = _load_padded(gm, conv, ops, name, plan, two_d, weights)
    mask = torch.cat([F.pad(torch.ones_like(w), (o, plan.width - o - k))
                      for w, (o, k) in zip(weights, plan.windows)])
    conv.register_buffer(MASK, mask.unsqueeze(2) if two_d else mask, persistent=False)
    gm.add_submodule(name, conv)
    x = lane.flat()
    if two_d:
        x = graph.call_method("unsqueeze", (x, 2))
    out = _padded_call(lane, conv, name, x, two_d, spec.bias)
    lane.node = graph.call_method("squeeze", (out, 2)) if two_d else out
    lane.two_d = False
    lane.channels = spec.out_channels
    lane.entries += entries


def _padded_conv(spec: ConvSpec, plan: KernelPlan, g: int, two_d: bool) -> nn.Module:
    """The empty grouped conv (1-D, or 2-D with a unit first axis) with the widest kernel."""
    kw = dict(groups=g * spec.groups, bias=spec.bias, dtype=spec.dtype, device=spec.device)
    pad = spec.padding
    if two_d:
        conv: nn.Module = nn.Conv2d(g * spec.in_channels, g * spec.out_channels,
                                    (1, plan.width), stride=(1, spec.stride),
                                    padding=pad if isinstance(pad, str) else (0, pad),
                                    dilation=(1, spec.dilation), **kw)
    else:
        conv = nn.Conv1d(g * spec.in_channels, g * spec.out_channels, plan.width,
                         stride=spec.stride, padding=pad, dilation=spec.dilation, **kw)
    return conv


def _load_padded(gm: fx.GraphModule, conv: nn.Module, ops: list[RowOp], name: str,
                 plan: KernelPlan, two_d: bool, weights: list[torch.Tensor]) -> list[WeightEntry]:
    """Copy the rows' padded weights (and biases) into ``conv``; their weight entries."""
    spec = ops[plan.target].key
    entry = WeightEntry(f"{name}.weight", tuple(op.param("weight") for op in ops), 0,
                        2 if two_d else None, "pad", plan.windows)
    entries = [entry]
    with torch.no_grad():
        conv.weight.copy_(entry.join(weights))
        conv.weight.requires_grad_(get_tensor(gm, ops[0].param("weight")).requires_grad)
        if spec.bias:
            bias_keys = tuple(op.param("bias") for op in ops)
            conv.bias.copy_(torch.cat([get_tensor(gm, k).detach() for k in bias_keys]))
            conv.bias.requires_grad_(get_tensor(gm, bias_keys[0]).requires_grad)
            entries.append(WeightEntry(f"{name}.bias", bias_keys, 0, None, "cat"))
    return entries


def _padded_call(lane: Lane, conv: nn.Module, name: str, x: fx.Node, two_d: bool,
                 has_bias: bool) -> fx.Node:
    """The fused conv's call: masked weights in training (so padding stays zero), else the
    module."""
    graph = lane.graph
    if lane.gm.training:
        weight = graph.call_function(torch.mul, (graph.get_attr(f"{name}.weight"),
                                                 graph.get_attr(f"{name}.{MASK}")))
        bias = graph.get_attr(f"{name}.bias") if has_bias else None
        fn = F.conv2d if two_d else F.conv1d
        return graph.call_function(fn, (x, weight, bias, conv.stride, conv.padding,
                                        conv.dilation, conv.groups))
    return graph.call_module(name, (x,))
