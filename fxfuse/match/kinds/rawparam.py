"""Per-row layers written with raw parameters: ``x_i @ W[i] (+ b[i])``,
``F.linear(x_i, W[i], b[i])``, ``torch.einsum("bi,io->bo", x_i, W[i])``, where ``W`` is one
stacked Parameter (n, ...) indexed by the row. Fused as one batched matmul that reads the
very same Parameter (``W`` itself when the rows take ``W[0], W[1], ...`` in order, else
``W[[i, j, ...]]``): nothing is copied, the state_dict and its keys do not change, and
gradients reach ``W`` as before.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ops import aten, packet
from ..params import get_tensor
from .base import Lane, MatmulKind, RowOp, register

MATMUL_FUNCTIONS = (operator.matmul, torch.matmul)
MATMUL_METHODS = ("matmul", "__matmul__")
ADD_FUNCTIONS = (operator.add, torch.add)


@dataclass(frozen=True)
class RawKey:
    """What must agree between rows: the spelling, which stacked tensors they index, and
    their shapes."""

    spelling: str              # "matmul", "linear", the einsum equation, or "bias"
    weight: str                # state_dict key of the stacked weight (or bias)
    weight_shape: tuple[int, ...]
    dtype: torch.dtype
    device: str


def attr_row(node: object) -> tuple[fx.Node, int] | None:
    """(attribute node, i) when ``node`` is ``P[i]`` (or ATen ``select(P, 0, i)``) of a
    ``get_attr`` ``P``, i a constant int; else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    if node.target is operator.getitem and len(node.args) == 2:
        base, index = node.args
    elif packet(node.target) is aten.select and len(node.args) == 3 and node.args[1] == 0:
        base, index = node.args[0], node.args[2]
    else:
        return None
    if isinstance(base, fx.Node) and base.op == "get_attr" and isinstance(index, int) \
            and not isinstance(index, bool):
        return base, index
    return None


def _row_of(node: object, root: nn.Module, ndim: int) -> tuple[str, int] | None:
    """(key, i) when ``node`` is ``P[i]`` of a stacked parameter/buffer ``P`` of rank
    ``ndim`` (i a constant int), else None."""
    found = attr_row(node)
    if found is None:
        return None
    base, index = found
    tensor = get_tensor(root, str(base.target))
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != ndim:
        return None
    return str(base.target), index % tensor.shape[0]


def _weight_call(node: fx.Node, root: nn.Module):
    """(spelling, input, weight (key, i), bias node or None) of a raw-weight product."""
    fn = node.op == "call_function"
    if _is_matmul(node, fn):
        if len(node.args) == 2 and not node.kwargs:
            return "matmul", node.args[0], _row_of(node.args[1], root, 3), None
    elif fn and (node.target is F.linear or packet(node.target) is aten.linear) \
            and len(node.args) >= 2:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return "linear", node.args[0], _row_of(node.args[1], root, 3), bias
    elif fn:
        return _einsum_call(node, root)
    return None


def _is_matmul(node: fx.Node, fn: bool) -> bool:
    """A matrix product (``@``, ``torch.matmul``, ``.matmul``, ATen ``matmul``)."""
    return fn and (node.target in MATMUL_FUNCTIONS or packet(node.target) is aten.matmul) or \
        node.op == "call_method" and node.target in MATMUL_METHODS


def _einsum_call(node: fx.Node, root: nn.Module):
    """:func:`_weight_call` of an einsum function call (ATen or torch), else None."""
    if packet(node.target) is aten.einsum and len(node.args) >= 2 \
            and isinstance(node.args[1], (list, tuple)) and len(node.args[1]) == 2:
        return _einsum(node.args[0], *node.args[1], root)
    if node.target is torch.einsum and len(node.args) == 3:
        return _einsum(*node.args, root)
    return None


def _einsum(eq: object, x: object, w: object, root: nn.Module):
    """An einsum ``x_i, W[i]`` whose first subscript of ``x`` leads the output (the batch)."""
    if isinstance(eq, str):
        eq = eq.replace(" ", "")
        ins, _, out = eq.partition("->")
        subs = ins.split(",")
        if len(subs) == 2 and "." not in eq and out and subs[0][:1] == out[:1] \
                and subs[0][:1] not in subs[1] and subs[0].isalpha() and subs[1].isalpha():
            return eq, x, _row_of(w, root, len(subs[1]) + 1), None
    return None


@register("rawparam")
class RawParamKind(MatmulKind):
    """A per-row product with one row of a stacked weight, plus one row of a stacked bias."""

    title = "raw-parameter layer"
    loop_title = "raw-parameter layers"

    def recognise(self, node: fx.Node, root: nn.Module) -> RowOp | None:
        call = _weight_call(node, root)
        if call is None:
            return self._bias(node, root)
        spelling, inp, weight, bias = call
        if weight is None or not isinstance(inp, fx.Node) or bias is not None:
            return None                # F.linear's bias: written as `+ b[i]` instead
        w = get_tensor(root, weight[0])
        key = RawKey(spelling, weight[0], tuple(w.shape[1:]), w.dtype, str(w.device))
        return RowOp(node, self.name, key, (), f"{weight[0]}.{weight[1]}", inp,
                     f"{spelling} {weight[0]}[{weight[1]}]")

    def _bias(self, node: fx.Node, root: nn.Module) -> RowOp | None:
        """``product + b[i]`` (either order), the product a raw-weight row op."""
        if not (node.op == "call_function" and len(node.args) == 2 and not node.kwargs
                and (node.target in ADD_FUNCTIONS or packet(node.target) is aten.add)):
            return None
        for prod, b in (node.args, node.args[::-1]):
            if isinstance(prod, fx.Node) and len(prod.users) == 1 \
                    and _weight_call(prod, root) is not None:
                row = _row_of(b, root, 2)
                if row is None:
                    return None
                t = get_tensor(root, row[0])
                key = RawKey("bias", row[0], tuple(t.shape[1:]), t.dtype, str(t.device))
                return RowOp(node, self.name, key, (), f"{row[0]}.{row[1]}", prod,
                             f"bias {row[0]}[{row[1]}]")
        return None

    def module_problem(self, root: nn.Module, op: RowOp) -> str:
        return ""

    def rows_problem(self, root: nn.Module, ops: list[RowOp]) -> str:
        rows = [_index(op) for op in ops]
        if len(set(rows)) != len(rows):
            return (f"rows read the same row of {ops[0].key.weight} more than once; fusing "
                    "would not change their result, but the rows are not distinct layers")
        return ""

    def emit(self, lane: Lane, ops: list[RowOp]) -> None:
        """(N, G, ..., L) → (N, G, ..., P): one einsum over the stacked weight's rows (or
        the rows' biases added at once)."""
        graph, key, g = lane.graph, ops[0].key, len(ops)
        rows = [_index(op) for op in ops]
        w = graph.get_attr(key.weight)
        if not (get_tensor(lane.gm, key.weight).shape[0] == g and rows == list(range(g))):
            w = graph.call_function(operator.getitem, (w, rows))
        if key.spelling == "bias":
            shape = (g,) + (1,) * (lane.row_ndim - 2) + (-1,)
            lane.node = graph.call_function(torch.add, (lane.node, graph.call_method(
                "reshape", (w, shape))))
            return
        if key.spelling == "matmul":
            eq = "ng...l,glp->ng...p"
        elif key.spelling == "linear":
            eq = "ng...l,gpl->ng...p"
        else:
            ins, out = key.spelling.split("->")
            x_sub, w_sub = ins.split(",")
            letter = next(c for c in "ghjkmnopqrstuvwxyzabcdefil" if c not in key.spelling)
            eq = f"{x_sub[0]}{letter}{x_sub[1:]},{letter}{w_sub}->{out[0]}{letter}{out[1:]}"
        lane.node = graph.call_function(torch.einsum, (eq, lane.node, w))


def _index(op: RowOp) -> int:
    return int(str(op.module).rpartition(".")[2])
