"""Elementwise rows (activations, dropout, arithmetic with a Python number): the same op
for every row, so it is applied once to all rows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from ..ops import POINTWISE, POINTWISE_MODULES, const_key, hooks_of, op_name, \
    tensor_args_only_first
from .base import RowKind, RowOp, called_module, register


@dataclass(frozen=True)
class PointwiseKey:
    """The op and its settings (for a module: its type, ``extra_repr`` and mode)."""

    spelling: str
    target: Any
    settings: str
    training: bool | None = None


@register("pointwise")
class PointwiseKind(RowKind):
    title = "elementwise op"
    per_element = True

    def recognise(self, node: fx.Node, root: nn.Module) -> RowOp | None:
        if node.op == "call_module":
            mod = called_module(node, root, POINTWISE_MODULES)
            if mod is None or hooks_of(mod):
                return None
            key = PointwiseKey("module", type(mod), mod.extra_repr(), mod.training)
            name = type(mod).__name__.lower()
        elif POINTWISE.matches(node):
            key = PointwiseKey(*const_key(node)[:2], repr(const_key(node)[2:]))
            name = op_name(node)
        else:
            return None
        if not tensor_args_only_first(node):
            return None          # e.g. x_h * y: the other operand is not a constant
        return RowOp(node, self.name, key, (), None, node.args[0], name)
