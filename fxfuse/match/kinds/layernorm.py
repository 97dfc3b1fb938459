"""LayerNorm rows over the last dim: ``nn.LayerNorm(L)``, ``F.layer_norm`` with attribute
weights, ``aten.layer_norm``. Per-sample statistics, so train and eval alike.

Fused as one weightless ``layer_norm`` over every row (each row, sample and channel is
normalised over its own last dim, as before), then the rows' stacked weights and biases
applied per row by broadcasting: (N, G, ..., L) * (G, 1, ..., L) + (G, 1, ..., L).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...graphs.build import fused_module, stacked_holder
from ..ops import LAYER_NORM, get_attr_args
from .base import Lane, RowKind, RowOp, called_module, register, roles


@dataclass(frozen=True)
class LayerNormKey:
    """What must agree between rows' layer norms."""

    normalized_shape: tuple[int, ...]
    eps: float
    weight: bool
    bias: bool


def _functional(node: fx.Node) -> tuple[fx.Node, tuple, str | None, str | None, float] | None:
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    args = dict(zip(names, node.args))
    args.update({k: v for k, v in node.kwargs.items() if k in names})
    inp, weight, bias = args.get("input"), args.get("weight"), args.get("bias")
    if not isinstance(inp, fx.Node) or (weight is not None or bias is not None) and \
            not get_attr_args(weight, bias):
        return None
    return (inp, tuple(args.get("normalized_shape", ())),
            None if weight is None else str(weight.target),
            None if bias is None else str(bias.target), float(args.get("eps", 1e-5)))


@register("layernorm")
class LayerNormKind(RowKind):
    title = "LayerNorm"
    module_base = nn.LayerNorm

    def recognise(self, node: fx.Node, root: nn.Module) -> RowOp | None:
        mod = called_module(node, root, (nn.LayerNorm,))
        if mod is not None:
            w = f"{node.target}.weight" if mod.weight is not None else None
            b = f"{node.target}.bias" if mod.bias is not None else None
            found = (node.args[0], tuple(mod.normalized_shape), w, b, float(mod.eps))
        else:
            found = _functional(node) if LAYER_NORM.calls_function(node) else None
        if found is None or len(found[1]) != 1:
            return None          # only the last dim: several dims would mix a row's axes
        inp, shape, w, b, eps = found
        params = roles(weight=w, bias=b)
        return RowOp(node, self.name, LayerNormKey(shape, eps, w is not None, b is not None),
                     params, str(node.target) if node.op == "call_module" else None, inp,
                     f"layernorm {shape[0]}")

    def emit(self, lane: Lane, ops: list[RowOp]) -> None:
        key, graph = ops[0].key, lane.graph
        rows = lane.per_row()
        out = graph.call_function(F.layer_norm, (rows, key.normalized_shape, None, None, key.eps))
        roles = [role for role, _ in ops[0].params]
        if roles:
            name, entries = fused_module(lane.gm, ops, "layernorm", lane.prefix,
                                         lambda: stacked_holder(lane.gm, ops, roles), how="stack")
            lane.entries += entries
            row_ndim = 3 if lane.family == "conv" else lane.row_ndim
            shape = (len(ops),) + (1,) * (row_ndim - 2) + key.normalized_shape
            w, b = (graph.call_method("view", (graph.get_attr(f"{name}.{role}"), *shape))
                    if role in roles else None for role in ("weight", "bias"))
            if w is not None and b is not None:
                out = graph.call_function(torch.addcmul, (b, out, w))
            elif w is not None:
                out = graph.call_function(torch.mul, (out, w))
            else:
                out = graph.call_function(torch.add, (out, b))
        lane.set_per_row(out)
