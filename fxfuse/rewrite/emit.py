"""Helpers the fused steps share: stock modules made once, loaded with the rows' weights.

Each row-op kind (:mod:`fxfuse.match.kinds`) emits its own fused step through these;
this module also emits the two rewrites that do not go step by step: rows folded into
the batch (all rows run the same layers) and rows summed by one dense op.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from ..match.ops import reemit
from ..match.params import get_tensor, twin_key
from .weights import WeightEntry

REGISTRY_KEY = "fxfuse_fused_modules"   # gm.meta: (variant, twin key) -> module name


def free_name(gm: fx.GraphModule, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``... whichever ``gm`` does not have yet."""
    candidate, i = name, 1
    while hasattr(gm, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def joined(gm: fx.GraphModule, ops: Sequence[Any], role: str, how: str, dim: int = 0
           ) -> torch.Tensor:
    """The rows' tensors playing ``role``, stacked or concatenated on ``dim``."""
    tensors = [get_tensor(gm, op.param(role)).detach() for op in ops]
    return torch.stack(tensors, dim) if how == "stack" else torch.cat(tensors, dim)


def _load(module: nn.Module, gm: fx.GraphModule, ops: Sequence[Any], name: str,
          how: str = "cat", unsqueeze: int | None = None) -> list[WeightEntry]:
    """Copy the rows' tensors into ``module``'s and describe the mapping."""
    entries = []
    with torch.no_grad():
        for role, _ in ops[0].params:
            target = getattr(module, role)
            parts = tuple(op.param(role) for op in ops)
            if role == "num_batches_tracked":
                target.copy_(get_tensor(gm, parts[0]))
                entries.append(WeightEntry(f"{name}.{role}", parts, 0, None, "same"))
                continue
            value = joined(gm, ops, role, how)
            target.copy_(value if unsqueeze is None or role != "weight" else value.unsqueeze(unsqueeze))
            if isinstance(target, nn.Parameter):
                target.requires_grad_(get_tensor(gm, parts[0]).requires_grad)
            entries.append(WeightEntry(f"{name}.{role}", parts, 0,
                                       unsqueeze if role == "weight" else None, how))
    return entries


def fused_module(gm: fx.GraphModule, ops: Sequence[Any], variant: str, prefix: str,
                 build: Callable[[], nn.Module], **load: Any) -> tuple[str, list[WeightEntry]]:
    """The fused module for these rows' weights: made once, and reused when another site
    runs the very same layers (a loop module applied twice), so weights stay tied."""
    registry = gm.meta.setdefault(REGISTRY_KEY, {})
    key = (variant, twin_key(ops))
    if key in registry and hasattr(gm, registry[key]):
        return registry[key], []
    module = build()
    name = free_name(gm, prefix)
    entries = _load(module, gm, ops, name, **load)
    gm.add_submodule(name, module)
    registry[key] = name
    return name, entries


def stacked_holder(gm: fx.GraphModule, ops: Sequence[Any], roles: Sequence[str]) -> nn.Module:
    """An empty module with one parameter per role, shaped like the rows' stacked tensors."""
    holder = nn.Module()
    for role in roles:
        like = get_tensor(gm, ops[0].param(role))
        setattr(holder, role, nn.Parameter(torch.empty(len(ops), *like.shape, dtype=like.dtype,
                                                       device=like.device)))
    return holder


def batched_chain(graph: fx.Graph, rows: fx.Node, ops: Sequence[Any], count: int) -> fx.Node:
    """All rows run the very same layers: fold rows into the batch, run them once."""
    from ..match.rowdag import row_leaves      # the kinds this module serves import it
    flat = graph.call_method("flatten", (rows, 0, 1))
    values = {leaf: flat for leaf in row_leaves(list(ops))}
    for op in ops:      # a row that is a DAG reads earlier steps, not only the last one
        values[op.node] = graph.create_node(
            op.node.op, op.node.target, fx.node.map_arg(op.node.args, lambda a: values.get(a, a)),
            dict(fx.node.map_arg(op.node.kwargs, lambda a: values.get(a, a))))
    return graph.call_method("unflatten", (values[ops[-1].node], 0, (-1, count)))


def dense_sum(gm: fx.GraphModule, rows: fx.Node, chains: list[list[Any]], prefix: str,
              reduce: str) -> tuple[fx.Node, list[WeightEntry]]:
    """Σ_h op_h(x_h) as one dense op over (N, H*C, L) (conv) or (N, H*L) (linear), with
    weights concatenated on the input dim and the stacked biases summed."""
    graph = gm.graph
    cur = rows
    for step in list(zip(*chains))[:-1]:
        cur = reemit(graph, step[0].node, step[0].input, cur)
    cur = graph.call_method("flatten", (cur, 1, 2))
    ops = [c[-1] for c in chains]
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
    if reduce == "mean":
        out = graph.call_function(torch.div, (out, len(ops)))
    return out, entries
