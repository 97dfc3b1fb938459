"""The two kinds rewrites that do not go step by step: rows folded into the batch (all
rows run the same layers) and rows summed by one dense op."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..graphs.build import free_name, fused_module, joined, stacked_holder
from ..match.ops import reemit
from ..match.params import get_tensor
from ..match.rowdag import row_leaves
from ..weightmap import WeightEntry


def batched_chain(graph: fx.Graph, rows: fx.Node, ops: Sequence[Any], count: int) -> fx.Node:
    """All rows run the very same layers: fold rows into the batch, run them once."""
    flat = graph.call_method("flatten", (rows, 0, 1))
    values = {leaf: flat for leaf in row_leaves(list(ops))}
    for op in ops:      # a row that is a DAG reads earlier steps, not only the last one
        values[op.node] = graph.create_node(
            op.node.op, op.node.target, fx.node.map_arg(op.node.args, lambda a: values.get(a, a)),
            dict(fx.node.map_arg(op.node.kwargs, lambda a: values.get(a, a))))
    return graph.call_method("unflatten", (values[ops[-1].node], 0, (-1, count)))


def dense_sum(gm: fx.GraphModule, rows: fx.Node, chains: list[list[Any]], prefix: str,
              reduce: str, *, row_ndim: int = 2, one_input: bool = False
              ) -> tuple[fx.Node, list[WeightEntry]]:
    """Σ_h op_h(x_h) as one dense op over (N, H*C, L) (conv) or (N, ..., H*L) (linear),
    with weights concatenated on the input dim and the stacked biases summed.

    With ``one_input`` (Linear rows that all read the very same tensor, ``fc1(h) +
    fc2(h)``; ``rows`` then holds that one row), Σ_h W_h x + b_h is one Linear of ``x``
    whose weight and bias are the stacked rows' summed: the fused module keeps the
    stacked tensors, so the weight map stays an exact ``stack``.
    """
    graph = gm.graph
    cur = rows
    for step in list(zip(*chains))[:-1]:
        cur = reemit(graph, step[0].node, step[0].input, cur)
    ops = [c[-1] for c in chains]
    if one_input:
        out, entries = _summed_linear(gm, graph.call_method("select", (cur, 1, 0)), ops, prefix)
    else:
        out, entries = _concatenated(gm, _joined_rows(graph, cur, ops, row_ndim), ops, prefix)
    if reduce == "mean":
        out = graph.call_function(torch.div, (out, len(ops)))
    return out, entries


def _joined_rows(graph: fx.Graph, rows: fx.Node, ops: list[Any], row_ndim: int) -> fx.Node:
    """The rows side by side on the dim the dense op reads: (N, H, C, L) → (N, H*C, L) for
    a conv, (N, H, ..., L) → (N, ..., H*L) for a Linear (its features are the last dim)."""
    if ops[0].row_kind.name != "linear" or row_ndim <= 2:
        return graph.call_method("flatten", (rows, 1, 2))
    moved = graph.call_method("movedim", (rows, 1, -2))
    return graph.call_method("flatten", (moved, -2, -1))


def _concatenated(gm: fx.GraphModule, cur: fx.Node, ops: list[Any], prefix: str
                  ) -> tuple[fx.Node, list[WeightEntry]]:
    """One dense op over the joined rows: weights concatenated on dim 1, biases summed."""
    graph = gm.graph
    weight = get_tensor(gm, ops[0].param("weight"))
    name = free_name(gm, prefix)
    module = ops[0].row_kind.dense(ops, weight)
    parts = tuple(op.param("weight") for op in ops)
    with torch.no_grad():
        module.weight.copy_(joined(gm, ops, "weight", "cat", dim=1))
    module.weight.requires_grad_(weight.requires_grad)
    gm.add_submodule(name, module)
    entries = [WeightEntry(f"{name}.weight", parts, 1, None, "cat")]
    out = graph.call_module(name, (cur,))
    if ops[0].param("bias") is not None:
        holder = nn.Module()
        holder.bias = nn.Parameter(joined(gm, ops, "bias", "stack"))
        holder.bias.requires_grad_(get_tensor(gm, ops[0].param("bias")).requires_grad)
        bias_name = free_name(gm, f"{name}_bias")
        gm.add_submodule(bias_name, holder)
        entries.append(WeightEntry(f"{bias_name}.bias", tuple(op.param("bias") for op in ops),
                                   0, None, "stack"))
        total = graph.call_method("sum", (graph.get_attr(f"{bias_name}.bias"), 0))
        if weight.dim() == 3:          # conv: the bias broadcasts over the length
            total = graph.call_method("unsqueeze", (total, -1))
        out = graph.call_function(torch.add, (out, total))
    return out, entries


def _summed_linear(gm: fx.GraphModule, x: fx.Node, ops: list[Any], prefix: str
                   ) -> tuple[fx.Node, list[WeightEntry]]:
    """``F.linear(x, W.sum(0), b.sum(0))`` over the rows' stacked weights (and biases)."""
    graph = gm.graph
    roles = ("weight", "bias") if ops[0].param("bias") is not None else ("weight",)
    name, entries = fused_module(gm, ops, "linear", prefix,
                                 lambda: stacked_holder(gm, ops, roles), how="stack")
    summed = [graph.call_method("sum", (graph.get_attr(f"{name}.{role}"), 0)) for role in roles]
    return graph.call_function(F.linear, (x, *summed)), entries
