"""Conv1d rows: ``nn.Conv1d``, ``F.conv1d`` with attribute weights, ``aten.convolution``.

Fused as one grouped ``Conv1d`` (or a grouped ``Conv2d`` with a (1, k) kernel on a
channels-last view, ``lowering="grouped2d"``, or unfold + batched matmul,
``lowering="im2col"``); summed rows as one dense ``Conv1d``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ...graphs.build import fused_module
from ..ops import CONV1D, aten, packet
from ..params import get_tensor
from ..sites import ConvSpec
from ...errors import RewriteError
from .base import Lane, RowKind, RowOp, register, roles
from .im2col import LOWERING as IM2COL, emit_im2col

_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


@dataclass(frozen=True)
class ConvCall:
    """A recognised Conv1d call: the row input node, where its weights live, its settings."""

    input: fx.Node
    weight_key: str            # state_dict key of the weight (module path + ".weight" or attr)
    bias_key: str | None
    module_target: str | None  # call_module target, when the conv is a module call
    stride: int
    padding: int | str
    dilation: int
    groups: int
    padding_mode: str


def _one(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"expected one value, got {value!r}")
        return value[0]
    return value


def _module_call(node: fx.Node, root: nn.Module) -> ConvCall | None:
    mod = root.get_submodule(str(node.target))
    if not isinstance(mod, nn.Conv1d) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    return ConvCall(node.args[0], f"{node.target}.weight",
                    f"{node.target}.bias" if mod.bias is not None else None, str(node.target),
                    mod.stride[0], mod.padding if isinstance(mod.padding, str) else mod.padding[0],
                    mod.dilation[0], mod.groups, mod.padding_mode)


def _call_args(node: fx.Node) -> dict[str, Any] | None:
    if packet(node.target) is aten.convolution:
        # (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        a = list(node.args) + [None] * 9
        if a[6] or any(a[7] or ()) or len(a[3] or ()) != 1:
            return None
        return dict(zip(_ARG_NAMES, a[:6]), groups=a[8])
    args = dict(zip(_ARG_NAMES, node.args))
    args.update({k: v for k, v in node.kwargs.items() if k in _ARG_NAMES})
    return args


def conv_call(node: fx.Node, root: nn.Module) -> ConvCall | None:
    """Describe ``node`` if it is a 1-D convolution fxfuse can read, else None."""
    if node.op == "call_module":
        return _module_call(node, root)
    args = _call_args(node) if CONV1D.calls_function(node) else None
    if args is None:
        return None
    weight, bias, inp = args.get("weight"), args.get("bias"), args.get("input")
    if not isinstance(inp, fx.Node) or not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
        return None
    try:
        padding = args.get("padding", 0)
        padding = padding if isinstance(padding, str) else int(_one(padding))
        return ConvCall(inp, str(weight.target), None if bias is None else str(bias.target), None,
                        int(_one(args.get("stride", 1))), padding,
                        int(_one(args.get("dilation", 1))), int(args.get("groups", 1) or 1), "zeros")
    except (TypeError, ValueError):
        return None


def conv_spec(root: nn.Module, call: ConvCall) -> ConvSpec:
    """The settings of one conv call, read from its weight and arguments."""
    weight = get_tensor(root, call.weight_key)
    return ConvSpec(
        in_channels=int(weight.shape[1]) * call.groups, out_channels=int(weight.shape[0]),
        kernel_size=int(weight.shape[2]), stride=call.stride, padding=call.padding,
        dilation=call.dilation, groups=call.groups, bias=call.bias_key is not None,
        padding_mode=call.padding_mode, dtype=weight.dtype, device=str(weight.device))


@register("conv")
class ConvKind(RowKind):
    """Per-row ``Conv1d``: rows fuse when their :class:`ConvSpec` agree; one grouped conv
    (``groups = rows * conv groups``) computes them all."""

    title = loop_title = "Conv1d"
    families = frozenset(("conv",))
    heavy = True
    module_base = nn.Conv1d

    def recognise(self, node: fx.Node, root: nn.Module) -> RowOp | None:
        call = conv_call(node, root)
        if call is None:
            return None
        spec = conv_spec(root, call)
        params = roles(weight=call.weight_key, bias=call.bias_key)
        return RowOp(node, self.name, spec, params, call.module_target, call.input,
                     f"conv {spec.describe()}")

    def emit(self, lane: Lane, ops: list[RowOp]) -> None:
        if len({op.key for op in ops}) > 1:      # kernel sizes differ (checked to line up)
            if lane.lowering == IM2COL:
                raise RewriteError("lowering='im2col' does not apply to conv rows whose "
                                   "kernel sizes differ; use lowering='grouped' or 'auto'")
            from .padded_conv import emit_padded
            return emit_padded(lane, ops)
        if lane.lowering == IM2COL:
            return emit_im2col(lane, ops)
        spec, g, graph = ops[0].key, len(ops), lane.graph
        kw = dict(groups=g * spec.groups, bias=spec.bias, padding_mode=spec.padding_mode,
                  dtype=spec.dtype, device=spec.device)
        pad, training = spec.padding, lane.gm.training
        if lane.lowering == "grouped2d":
            name, entries = fused_module(lane.gm, ops, "conv2d", lane.prefix, lambda: nn.Conv2d(
                g * spec.in_channels, g * spec.out_channels, (1, spec.kernel_size),
                stride=(1, spec.stride), padding=pad if isinstance(pad, str) else (0, pad),
                dilation=(1, spec.dilation), **kw).train(training), unsqueeze=2)
            x = lane.node if lane.two_d else graph.call_method("unsqueeze", (lane.node, 2))
            lane.node = graph.call_method("squeeze", (graph.call_module(name, (x,)), 2))
            lane.two_d = False
        else:
            name, entries = fused_module(lane.gm, ops, "conv1d", lane.prefix, lambda: nn.Conv1d(
                g * spec.in_channels, g * spec.out_channels, spec.kernel_size, stride=spec.stride,
                padding=pad, dilation=spec.dilation, **kw).train(training))
            lane.node = graph.call_module(name, (lane.flat(),))
        lane.channels = spec.out_channels
        lane.entries += entries

    def can_sum(self, op: RowOp) -> bool:
        return op.key.groups == 1

    def dense(self, ops: list[RowOp], weight: torch.Tensor) -> nn.Module:
        spec = ops[0].key
        return nn.Conv1d(len(ops) * spec.in_channels, spec.out_channels, spec.kernel_size,
                         stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
                         bias=False, padding_mode=spec.padding_mode, dtype=weight.dtype,
                         device=weight.device)
