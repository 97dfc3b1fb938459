"""The operator tables: what a graph node *is*, in every spelling fxfuse reads.

Both graphs fxfuse sees are covered: ``torch.fx.symbolic_trace`` output (``torch.*``
functions, ``Tensor`` methods, ``call_module``) and ``torch.export`` output (ATen ops,
``get_attr`` weights). Each family of ops is one :class:`OpTable` holding all three
spellings; the rest of the package asks these tables and never looks at targets itself.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten


def packet(target: Any) -> Any:
    """The ATen overload packet of ``target`` (``aten.add`` for ``aten.add.Tensor``), or None."""
    return getattr(target, "overloadpacket", None)


@dataclass(frozen=True)
class OpTable:
    """One op family in its three spellings: ``torch`` functions, ``Tensor`` methods and
    ATen overload packets."""

    functions: frozenset = frozenset()
    methods: frozenset = frozenset()
    aten: frozenset = frozenset()

    def __init__(self, functions=(), methods=(), aten=()) -> None:
        object.__setattr__(self, "functions", frozenset(functions))
        object.__setattr__(self, "methods", frozenset(methods))
        object.__setattr__(self, "aten", frozenset(aten))

    def matches(self, node: fx.Node) -> bool:
        """True when ``node`` calls one of the table's ops (functions, methods or ATen)."""
        if node.op == "call_function":
            return node.target in self.functions or packet(node.target) in self.aten
        return node.op == "call_method" and node.target in self.methods

    def calls_function(self, node: fx.Node) -> bool:
        """True for a ``call_function`` of the table (methods not included)."""
        return node.op == "call_function" and (node.target in self.functions
                                               or packet(node.target) in self.aten)


# Ops that only move, drop or regroup elements. Evaluated on an index tensor they tell
# exactly which source element lands where, whatever the spelling.
INDEX = OpTable(
    functions=(operator.getitem, torch.select, torch.narrow, torch.squeeze, torch.unsqueeze,
               torch.unbind, torch.split, torch.chunk, torch.tensor_split, torch.movedim,
               torch.moveaxis, torch.permute, torch.transpose, torch.swapaxes, torch.swapdims,
               torch.flatten, torch.unflatten, torch.reshape, torch.t),
    methods=("select", "narrow", "squeeze", "unsqueeze", "unbind", "split", "chunk",
             "tensor_split", "movedim", "moveaxis", "permute", "transpose", "swapaxes",
             "swapdims", "flatten", "unflatten", "view", "reshape", "contiguous", "t",
             "__getitem__"),
    aten=(aten.select, aten.slice, aten.narrow, aten.squeeze, aten.unsqueeze, aten.unbind,
          aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split, aten.permute,
          aten.transpose, aten.movedim, aten.view, aten.reshape, aten._unsafe_view,
          aten.flatten, aten.unflatten, aten.contiguous, aten.clone, aten.alias,
          aten.t, aten.alias_copy, aten.select_copy, aten.slice_copy, aten.view_copy,
          aten.unsqueeze_copy, aten.squeeze_copy, aten.permute_copy, aten.transpose_copy))
CAT = OpTable(functions=(torch.cat, torch.concat, torch.concatenate), aten=(aten.cat, aten.concat))
STACK = OpTable(functions=(torch.stack,), aten=(aten.stack,))
BUFFER = OpTable(
    functions=(torch.zeros, torch.empty, torch.full, torch.zeros_like, torch.empty_like,
               torch.full_like),
    methods=("new_zeros", "new_empty", "new_full"),
    aten=(aten.zeros, aten.empty, aten.full, aten.new_zeros, aten.new_empty, aten.new_full,
          aten.zeros_like, aten.empty_like, aten.full_like))
# Conversions of a fresh buffer (``torch.zeros(...).to(x.device)``, ``.type_as(x)``,
# ``.cuda()``): the result is still a fresh tensor the loop fills.
CONVERT = OpTable(methods=("to", "type_as", "type", "cuda", "cpu", "float", "double", "half",
                           "bfloat16"),
                  aten=(aten.to, aten._to_copy, aten.type_as, aten.lift_fresh_copy))
META_CHECK = OpTable(aten=(aten._assert_tensor_metadata,))
COPY = OpTable(functions=(operator.setitem,), methods=("copy_",), aten=(aten.copy_, aten.copy))
ADD = OpTable(functions=(operator.add, torch.add), aten=(aten.add,))
SUM = OpTable(functions=(torch.sum,), methods=("sum",), aten=(aten.sum,))
MEAN = OpTable(functions=(torch.mean,), methods=("mean",), aten=(aten.mean,))
SIZE_QUERY = OpTable(aten=(aten.sym_size,))

# Elementwise ops: applying them to all rows at once equals applying them row by row.
POINTWISE = OpTable(
    functions=(F.relu, F.relu6, F.gelu, F.silu, F.elu, F.selu, F.celu, F.leaky_relu, F.hardtanh,
               F.hardswish, F.hardsigmoid, F.mish, F.softplus, F.tanh, F.sigmoid, F.dropout,
               torch.relu, torch.tanh, torch.sigmoid, torch.dropout, torch.abs, torch.exp,
               torch.neg, operator.mul, operator.add, operator.sub, operator.truediv,
               operator.neg, torch.mul, torch.add, torch.sub, torch.div, torch.clamp,
               torch.square, torch.clone),
    methods=("relu", "tanh", "sigmoid", "abs", "exp", "neg", "mul", "add", "sub", "div",
             "clamp", "square", "__mul__", "__add__", "__sub__", "__truediv__", "contiguous",
             "clone"),
    aten=(aten.relu, aten.gelu, aten.silu, aten.elu, aten.leaky_relu, aten.hardtanh, aten.tanh,
          aten.sigmoid, aten.mul, aten.add, aten.sub, aten.div, aten.clamp, aten.abs, aten.exp,
          aten.neg, aten.dropout, aten.relu6, aten.hardswish, aten.mish, aten.softplus,
          aten.square))
POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU,
                     nn.LeakyReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish,
                     nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity)
PAD = OpTable(functions=(F.pad, torch.constant_pad_nd),
              aten=(aten.pad, aten.constant_pad_nd, aten.reflection_pad1d,
                    aten.replication_pad1d))
CONV1D = OpTable(functions=(F.conv1d, torch.conv1d), aten=(aten.conv1d, aten.convolution))
LINEAR = OpTable(functions=(F.linear,), aten=(aten.linear,))
BATCH_NORM = OpTable(aten=(aten.batch_norm,))
LAYER_NORM = OpTable(functions=(F.layer_norm, torch.layer_norm), aten=(aten.layer_norm,))
GROUP_NORM = OpTable(functions=(F.group_norm, torch.group_norm), aten=(aten.group_norm,))


INDEX_MODULES = (nn.Flatten, nn.Unflatten)


def is_index_op(node: fx.Node) -> bool:
    """True when ``node`` only rearranges the elements of its first argument (including
    a call of an ``nn.Flatten``/``nn.Unflatten`` module without hooks)."""
    return INDEX.matches(node) or _index_module(node) is not None


def _index_module(node: fx.Node) -> nn.Module | None:
    """The ``nn.Flatten``/``nn.Unflatten`` module ``node`` calls on one tensor, or None."""
    root = node.graph.owning_module
    if node.op != "call_module" or root is None or len(node.args) != 1 or node.kwargs:
        return None
    try:
        mod = root.get_submodule(str(node.target))
    except AttributeError:
        return None
    return mod if type(mod) in INDEX_MODULES and not hooks_of(mod) else None


def data_input(node: fx.Node) -> fx.Node | None:
    """The tensor an index op reads (its first argument), or None."""
    if node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    first = node.kwargs.get("input", node.kwargs.get("self"))
    return first if isinstance(first, fx.Node) else None


def combine_kind(node: fx.Node) -> str | None:
    """``"cat"`` or ``"stack"`` when ``node`` joins a list of tensors, else None."""
    if CAT.calls_function(node):
        return "cat"
    if STACK.calls_function(node):
        return "stack"
    return None


def combine_members(node: fx.Node) -> list[Any]:
    """The list of tensors a cat/stack node joins."""
    seq = node.args[0] if node.args else node.kwargs.get("tensors", ())
    return list(seq) if isinstance(seq, (list, tuple)) else []


def is_buffer_alloc(node: fx.Node) -> bool:
    """True for a fresh tensor allocation (``zeros``, ``new_empty``, ...)."""
    return BUFFER.matches(node)


def is_copy_into(node: fx.Node) -> bool:
    """True for an in-place write ``dst.copy_(src)`` (ATen) or ``dst[idx] = src`` (fx)."""
    return COPY.matches(node)


def tensor_args_only_first(node: fx.Node) -> bool:
    """True when the first argument is the only tensor ``node`` reads (``x * 2``, not
    ``x * y``)."""
    nodes = node.all_input_nodes
    return bool(nodes and node.args and node.args[0] is nodes[0]
                and all(n is nodes[0] for n in nodes))


def const_key(node: fx.Node) -> tuple:
    """What must agree between two calls of the same op for one call to do both: the
    target and every argument after the tensor."""
    return (node.op, node.target, repr(node.args[1:]), repr(sorted(node.kwargs.items())))


def op_name(node: fx.Node) -> str:
    """A short name of what ``node`` calls (``relu``, ``add``)."""
    if node.op == "call_method":
        return str(node.target).strip("_")
    return getattr(packet(node.target) or node.target, "__name__", str(node.target))


def get_attr_args(*args: Any) -> bool:
    """True when every argument is None or a ``get_attr`` node (weights of a functional
    or exported op), and at least one is not None."""
    present = [a for a in args if a is not None]
    return bool(present) and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in present)


def hooks_of(mod: torch.nn.Module) -> list[str]:
    """Names of the hook kinds registered on ``mod`` (a fused module would lose them)."""
    kinds = {"forward hooks": mod._forward_hooks, "forward pre-hooks": mod._forward_pre_hooks,
             "backward hooks": mod._backward_hooks,
             "state_dict hooks": getattr(mod, "_state_dict_hooks", {})}
    names = [k for k, v in kinds.items() if v]
    if getattr(mod, "parametrizations", None):
        names.append("parametrizations")
    return names


def reemit(graph: fx.Graph, node: fx.Node, old: fx.Node, new: fx.Node) -> fx.Node:
    """A copy of ``node`` (at the graph's insert point) reading ``new`` where it read ``old``."""
    args = tuple(new if a is old else a for a in node.args)
    kwargs = {k: (new if v is old else v) for k, v in node.kwargs.items()}
    return graph.create_node(node.op, node.target, args, kwargs)
