"""Padding of the last dim only (how exported convs with ``padding_mode="reflect"`` etc.
pad each row): the same on every channel, so it pads all rows at once. Unlike an
elementwise op it does not commute with moving dims around."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from ..ops import PAD, const_key, tensor_args_only_first
from .base import RowKind, RowOp, register


@dataclass(frozen=True)
class PadKey:
    """The pad op and its arguments."""

    target: Any
    settings: str


@register("pad")
class PadKind(RowKind):
    title = "pad"
    per_element = True

    def recognise(self, node: fx.Node, root: nn.Module) -> RowOp | None:
        if not PAD.calls_function(node):
            return None
        pad = node.args[1] if len(node.args) > 1 else \
            node.kwargs.get("pad", node.kwargs.get("padding"))
        if not isinstance(pad, (list, tuple)) or len(pad) != 2 or not tensor_args_only_first(node):
            return None
        return RowOp(node, self.name, PadKey(node.target, repr(const_key(node)[2:])), (), None,
                     node.args[0], "pad")
