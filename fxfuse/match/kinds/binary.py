"""Elementwise ops between two tensors of the same row: the gate of a GLU
(``sigmoid(a_h) * b_h``), a residual (``y_h + x_h``, ``y_h + skip_h(x_h)``). They make a
row a small DAG rather than a chain (:mod:`fxfuse.match.rowdag`); fused, the op runs once
on the two fused operands, which share one layout.

Only operands of equal shape and dtype: broadcasting inside a row (``(N, T, d) * (N, 1,
d)``) would not broadcast the same way in the grouped conv layout.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ...trace.tracing import tensor_dtype, tensor_shape
from ..ops import OpTable, aten, op_name
from .base import Lane, RowKind, RowOp, register

BINARY = OpTable(
    functions=(operator.add, operator.sub, operator.mul, operator.truediv, torch.add,
               torch.sub, torch.mul, torch.div),
    methods=("add", "sub", "mul", "div", "__add__", "__sub__", "__mul__", "__truediv__"),
    aten=(aten.add, aten.sub, aten.mul, aten.div))


@dataclass(frozen=True)
class BinaryKey:
    """The op and its constant settings (``alpha=``, ``rounding_mode=``)."""

    spelling: str
    target: Any
    settings: str


def operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensors a binary op of equal-shaped operands reads, or None."""
    if not BINARY.matches(node) or len(node.args) != 2 or \
            not all(isinstance(a, fx.Node) for a in node.args) or \
            any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return None
    a, b = node.args
    shape = tensor_shape(a)
    if shape is None or tensor_shape(b) != shape or tensor_shape(node) != shape or \
            tensor_dtype(a) != tensor_dtype(b):
        return None
    return a, b


@register("binary")
class BinaryKind(RowKind):
    title = "elementwise op on two per-row tensors"

    def recognise(self, node: fx.Node, root: nn.Module) -> RowOp | None:
        if operands(node) is None:
            return None
        key = BinaryKey(node.op, node.target, repr(sorted(node.kwargs.items())))
        return RowOp(node, self.name, key, (), None, node.args[0], op_name(node))

    def emit(self, lane: Lane, ops: list[RowOp]) -> None:
        """The op once, on the fused values of its two operands."""
        node = ops[0].node
        first = lane.flat()
        args = tuple(first if i == 0 else lane.value(a) for i, a in enumerate(node.args))
        lane.node = lane.graph.create_node(node.op, node.target, args, dict(node.kwargs))
