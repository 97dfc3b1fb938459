"""Linear rows (per-row heads): ``nn.Linear``, ``F.linear`` with attribute weights,
``aten.linear``. Fused as one batched matmul over (N, G, ..., L) with the G weights
stacked; summed rows as one dense ``Linear``."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ...graphs.build import fused_module, stacked_holder
from ..ops import LINEAR, get_attr_args
from ..params import get_tensor
from .base import Lane, MatmulKind, RowOp, register, roles


@dataclass(frozen=True)
class LinearKey:
    """What must agree between rows' Linear layers."""

    weight_shape: tuple[int, ...]
    bias: bool
    dtype: torch.dtype
    device: str


def _operands(node: fx.Node, root: nn.Module) -> tuple[fx.Node, str, str | None] | None:
    """(input, weight key, bias key) of a Linear call, or None."""
    if node.op == "call_module":
        mod = root.get_submodule(str(node.target))
        if not isinstance(mod, nn.Linear) or len(node.args) != 1 or \
                not isinstance(node.args[0], fx.Node):
            return None
        return node.args[0], f"{node.target}.weight", \
            f"{node.target}.bias" if mod.bias is not None else None
    if not LINEAR.calls_function(node) or not node.args:
        return None
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if weight is None or not get_attr_args(weight, bias):
        return None
    return node.args[0], str(weight.target), None if bias is None else str(bias.target)


@register("linear")
class LinearKind(MatmulKind):
    """Per-row ``Linear`` heads, fused as one batched matmul."""

    title = "Linear"
    loop_title = "Linear heads"
    module_base = nn.Linear

    def recognise(self, node: fx.Node, root: nn.Module) -> RowOp | None:
        if (found := _operands(node, root)) is None:
            return None
        inp, w, b = found
        weight = get_tensor(root, w)
        key = LinearKey(tuple(weight.shape), b is not None, weight.dtype, str(weight.device))
        params = roles(weight=w, bias=b)
        return RowOp(node, self.name, key, params,
                     str(node.target) if node.op == "call_module" else None, inp,
                     f"linear {weight.shape[1]}→{weight.shape[0]}")

    def emit(self, lane: Lane, ops: list[RowOp]) -> None:
        """(N, G, ..., L) → (N, G, ..., P) with the G weights stacked: one batched matmul."""
        has_bias = ops[0].param("bias") is not None
        roles = ("weight", "bias") if has_bias else ("weight",)
        name, entries = fused_module(lane.gm, ops, "linear", lane.prefix,
                                     lambda: stacked_holder(lane.gm, ops, roles), how="stack")
        lane.entries += entries
        graph, cur, ndim = lane.graph, lane.node, lane.row_ndim
        weight = get_tensor(lane.gm, ops[0].param("weight"))
        w = graph.get_attr(f"{name}.weight")
        b = graph.get_attr(f"{name}.bias") if has_bias else None
        if weight.shape[1] == 1:   # Linear(1, P) per row: a broadcast multiply-add
            w0 = graph.call_function(operator.getitem, (w, (Ellipsis, 0)))
            if ndim > 2:           # (G, P) -> (G, 1, ..., P) against (N, G, ..., 1)
                shape = (len(ops),) + (1,) * (ndim - 2) + (weight.shape[0],)
                w0 = graph.call_method("view", (w0, *shape))
                b = None if b is None else graph.call_method("view", (b, *shape))
            lane.node = graph.call_function(torch.mul, (cur, w0)) if b is None else \
                graph.call_function(torch.addcmul, (b, cur, w0))
        elif ndim == 2:           # (N, G, L): G matmuls (N, L) @ (L, P) in one baddbmm
            xt = graph.call_method("transpose", (cur, 0, 1))
            wt = graph.call_method("transpose", (w, 1, 2))
            out = graph.call_function(torch.bmm, (xt, wt)) if b is None else graph.call_function(
                torch.baddbmm, (graph.call_method("unsqueeze", (b, 1)), xt, wt))
            lane.node = graph.call_method("transpose", (out, 0, 1))
        else:
            out = graph.call_function(torch.einsum, ("ng...l,gpl->ng...p", cur, w))
            if b is not None:
                shape = (len(ops),) + (1,) * (ndim - 2) + (weight.shape[0],)
                out = graph.call_function(torch.add, (out, graph.call_method("view", (b, *shape))))
            lane.node = out

    def can_sum(self, op: RowOp) -> bool:
        return True

    def dense(self, ops: list[RowOp], weight: torch.Tensor) -> nn.Module:
        return nn.Linear(len(ops) * weight.shape[1], weight.shape[0], bias=False,
                         dtype=weight.dtype, device=weight.device)
