"""What a graph node *is*: an index-only op, a combine op, a buffer, or a Conv1d call.

Both graphs fxfuse sees are covered: ``torch.fx.symbolic_trace`` output (``torch.*``
functions, ``Tensor`` methods, ``call_module``) and ``torch.export`` output (ATen ops,
``get_attr`` weights). The matcher asks these predicates and never looks at targets
itself.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

# Ops that only move, drop or regroup elements. Evaluated on an index tensor they tell
# exactly which source element lands where, whatever the spelling.
_INDEX_FUNCTIONS: set[Any] = {
    operator.getitem, torch.select, torch.narrow, torch.squeeze, torch.unsqueeze,
    torch.unbind, torch.split, torch.chunk, torch.tensor_split, torch.movedim,
    torch.moveaxis, torch.permute, torch.transpose, torch.swapaxes, torch.swapdims,
    torch.flatten, torch.unflatten, torch.reshape, torch.t,
}
_INDEX_METHODS = {
    "select", "narrow", "squeeze", "unsqueeze", "unbind", "split", "chunk",
    "tensor_split", "movedim", "moveaxis", "permute", "transpose", "swapaxes",
    "swapdims", "flatten", "unflatten", "view", "reshape", "contiguous", "t",
    "__getitem__",
}
_INDEX_ATEN_PACKETS = {
    aten.select, aten.slice, aten.narrow, aten.squeeze, aten.unsqueeze, aten.unbind,
    aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split, aten.permute,
    aten.transpose, aten.movedim, aten.view, aten.reshape, aten._unsafe_view,
    aten.flatten, aten.unflatten, aten.contiguous, aten.clone, aten.alias,
    aten.t, aten.alias_copy, aten.select_copy, aten.slice_copy, aten.view_copy,
    aten.unsqueeze_copy, aten.squeeze_copy, aten.permute_copy, aten.transpose_copy,
}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_STACK = {torch.stack}
_CAT_ATEN = {aten.cat, aten.concat}
_STACK_ATEN = {aten.stack}
_BUFFER_FUNCTIONS = {torch.zeros, torch.empty, torch.full, torch.zeros_like, torch.empty_like,
                     torch.full_like}
_BUFFER_METHODS = {"new_zeros", "new_empty", "new_full"}
_BUFFER_ATEN = {aten.zeros, aten.empty, aten.full, aten.new_zeros, aten.new_empty,
                aten.new_full, aten.zeros_like, aten.empty_like, aten.full_like}
_COPY_ATEN = {aten.copy_, aten.copy}


def _packet(target: Any) -> Any:
    return getattr(target, "overloadpacket", None)


def is_index_op(node: fx.Node) -> bool:
    """True when ``node`` only rearranges the elements of its first argument."""
    if node.op == "call_function":
        return node.target in _INDEX_FUNCTIONS or _packet(node.target) in _INDEX_ATEN_PACKETS
    if node.op == "call_method":
        return node.target in _INDEX_METHODS
    return False


def data_input(node: fx.Node) -> fx.Node | None:
    """The tensor an index op reads (its first argument), or None."""
    if node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    first = node.kwargs.get("input", node.kwargs.get("self"))
    return first if isinstance(first, fx.Node) else None


def combine_kind(node: fx.Node) -> str | None:
    """``"cat"`` or ``"stack"`` when ``node`` joins a list of tensors, else None."""
    if node.op != "call_function":
        return None
    if node.target in _CAT or _packet(node.target) in _CAT_ATEN:
        return "cat"
    if node.target in _STACK or _packet(node.target) in _STACK_ATEN:
        return "stack"
    return None


def combine_members(node: fx.Node) -> list[Any]:
    """The list of tensors a cat/stack node joins."""
    seq = node.args[0] if node.args else node.kwargs.get("tensors", ())
    return list(seq) if isinstance(seq, (list, tuple)) else []


def is_buffer_alloc(node: fx.Node) -> bool:
    """True for a fresh tensor allocation (``zeros``, ``new_empty``, ...)."""
    if node.op == "call_function":
        return node.target in _BUFFER_FUNCTIONS or _packet(node.target) in _BUFFER_ATEN
    return node.op == "call_method" and node.target in _BUFFER_METHODS


def is_copy_into(node: fx.Node) -> bool:
    """True for an in-place write ``dst.copy_(src)`` (ATen) or ``dst[idx] = src`` (fx)."""
    if node.op == "call_function":
        return node.target is operator.setitem or _packet(node.target) in _COPY_ATEN
    return node.op == "call_method" and node.target == "copy_"


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


_CONV_FUNCTIONS = {F.conv1d, torch.conv1d}
_CONV_ATEN = {aten.conv1d, aten.convolution}
_CONV_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _functional_args(node: fx.Node) -> dict[str, Any]:
    args = dict(zip(_CONV_ARG_NAMES, node.args))
    args.update({k: v for k, v in node.kwargs.items() if k in _CONV_ARG_NAMES})
    return args


def conv_call(node: fx.Node, root: torch.nn.Module) -> ConvCall | None:
    """Describe ``node`` if it is a 1-D convolution fxfuse can read, else None."""
    if node.op == "call_module":
        mod = root.get_submodule(str(node.target))
        if not isinstance(mod, torch.nn.Conv1d):
            return None
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        return ConvCall(node.args[0], f"{node.target}.weight",
                        f"{node.target}.bias" if mod.bias is not None else None, str(node.target),
                        mod.stride[0], mod.padding if isinstance(mod.padding, str) else mod.padding[0],
                        mod.dilation[0], mod.groups, mod.padding_mode)
    if node.op != "call_function":
        return None
    is_aten_conv = _packet(node.target) in _CONV_ATEN
    if node.target not in _CONV_FUNCTIONS and not is_aten_conv:
        return None
    if _packet(node.target) is aten.convolution:
        # (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        a = list(node.args) + [None] * 9
        if a[6] or any(a[7] or ()) or len(a[3] or ()) != 1:
            return None
        args = dict(zip(_CONV_ARG_NAMES, a[:6]), groups=a[8])
    else:
        args = _functional_args(node)
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


def hooks_of(mod: torch.nn.Module) -> list[str]:
    """Names of the hook kinds registered on ``mod`` (a fused module would lose them)."""
    kinds = {"forward hooks": mod._forward_hooks, "forward pre-hooks": mod._forward_pre_hooks,
             "backward hooks": mod._backward_hooks,
             "state_dict hooks": getattr(mod, "_state_dict_hooks", {})}
    names = [k for k, v in kinds.items() if v]
    if getattr(mod, "parametrizations", None):
        names.append("parametrizations")
    return names
