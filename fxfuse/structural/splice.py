"""Put a traced vectorised body into the model's graph in place of its rows.

The stacked tensors become parameters and buffers of one new submodule; the body's
ATen nodes are copied in right after the last node of the rows; each row's value ``v``
is replaced by ``stacked[r]`` (then :mod:`joins` turns a ``cat`` / ``stack`` / sum of
all of them back into one view or reduction); the rows' own nodes are erased.
"""
from __future__ import annotations

import re

import torch
from torch import fx, nn

from .body import RowFunction
from .bounds import Bound
from .graphfacts import mutated_input
from .plan import RowPlan
from .reads import RowsRead
from .vectorise import Body, Operand


def attr_name(name: str) -> str:
    """A parameter name for ``name`` (``m0.weight`` -> ``m0_weight``)."""
    return re.sub(r"\W", "_", name)


def holder_module(row: RowFunction) -> nn.Module:
    """A module holding the stacked tensors as parameters and buffers."""
    holder = nn.Module()
    for s in row.stacked:
        name = attr_name(s.name)
        if s.parameter:
            holder.register_parameter(name, nn.Parameter(s.value.clone(),
                                                         requires_grad=s.requires_grad))
        else:
            holder.register_buffer(name, s.value.clone(), persistent=s.persistent)
    return holder


def splice(gm: fx.GraphModule, plan: RowPlan, body: Body, row: RowFunction,
           reads: dict[int, RowsRead], holder: str, batch_source: fx.Node | None,
           cuts: tuple = (), bounds: tuple = ()) -> list[fx.Node]:
    """Insert ``body`` for ``plan``'s rows; returns the new stacked results, one per leak
    (``cuts``: padded rows, per row, per leak, the ``(dim, size)`` narrows that give the
    row's own result back; ``bounds``: the index inputs to guard, :mod:`bounds`)."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    anchor = max(plan.nodes(), key=order.__getitem__)
    cursor = [anchor]
    made: list[fx.Node] = []

    def emit(op: str, target, args, kwargs=None) -> fx.Node:
        with graph.inserting_after(cursor[0]):
            node = graph.create_node(op, target, args, kwargs or {})
        cursor[0] = node
        made.append(node)
        return node

    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in body.graph_module.graph.nodes if n.op == "placeholder"]
    for operand, ph in zip(body.operands, placeholders):
        env[ph] = _operand_node(emit, operand, plan, reads, holder)
        bound = next((b for b in bounds if b.slot == operand.slot), None)
        if bound is not None and operand.kind in ("rows", "shared"):
            env[ph] = _guard(gm, emit, env[ph], ph, operand, bound, holder)
    if body.batched:
        env[placeholders[-1]] = emit("call_method", "size", (batch_source, 0))
    outputs: list[fx.Node] = []
    for node in body.graph_module.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            outputs = list(fx.node.map_arg(node.args[0], lambda n: env[n]))
            continue
        if node.op == "get_attr":
            env[node] = _constant(gm, emit, body.graph_module, node, holder)
            continue
        with graph.inserting_after(cursor[0]):
            new = graph.node_copy(node, lambda n: env[n])
        cursor[0] = new
        made.append(new)
        env[node] = new
    _redirect(gm, emit, plan, outputs, cuts)
    _erase(graph, plan)
    _place(gm, made)
    return outputs


def _operand_node(emit, operand, plan: RowPlan, reads: dict[int, RowsRead],
                  holder: str) -> fx.Node:
    if operand.kind == "stacked":
        return emit("get_attr", f"{holder}.{attr_name(operand.name)}", ())
    if operand.kind == "weight":
        return emit("get_attr", operand.name, ())
    if operand.kind == "shared":
        return plan.inputs[operand.slot][0]
    read = reads[operand.slot]
    if read.how == "stack":
        return emit("call_function", torch.stack, (list(read.nodes), 0))
    rows = len(read.nodes)
    if read.narrow:
        return emit("call_method", "narrow", (read.source, read.in_dim, 0, rows))
    if read.width is not None:
        return emit("call_method", "unflatten", (read.source, read.in_dim, (rows, read.width)))
    return read.source


def _guard(gm: fx.GraphModule, emit, index: fx.Node, ph: fx.Node, operand: Operand,
           bound: Bound, holder: str) -> fx.Node:
    """``index`` with every entry outside its row's ``[0, limit)`` replaced by one past
    every table (so the fused lookup raises, as the row's own lookup did)."""
    like = ph.meta["val"]
    if operand.kind == "rows":
        shape = [1] * like.dim()
        shape[operand.in_dim] = len(bound.limits)
        limits = torch.tensor(bound.limits, dtype=like.dtype).reshape(shape)
    else:
        limits = torch.tensor(min(bound.limits), dtype=like.dtype)
    name = attr_name(f"bound_in{operand.slot}")
    gm.get_submodule(holder).register_buffer(name, limits, persistent=False)
    limit = emit("get_attr", f"{holder}.{name}", ())
    low = emit("call_function", torch.ge,
               (index, emit("call_function", torch.neg, (limit,)) if bound.wraps else 0))
    high = emit("call_function", torch.lt, (index, limit))
    inside = emit("call_function", torch.logical_and, (low, high))
    return emit("call_function", torch.where, (inside, index, bound.outside(like.dtype)))


def _constant(gm: fx.GraphModule, emit, traced: fx.GraphModule, node: fx.Node,
              holder: str) -> fx.Node:
    value = getattr(traced, str(node.target))
    module = gm.get_submodule(holder)
    name = attr_name(f"const_{node.target}")
    if isinstance(value, torch.Tensor):
        module.register_buffer(name, value.detach().clone(), persistent=False)
    else:
        setattr(module, name, value)
    return emit("get_attr", f"{holder}.{name}", ())


def _redirect(gm: fx.GraphModule, emit, plan: RowPlan, outputs: list[fx.Node],
              cuts: tuple = ()) -> None:
    inside = plan.nodes()
    for r, body in enumerate(plan.bodies):
        for k, (p, stacked) in enumerate(zip(plan.leaks, outputs)):
            value = body[p]
            users = [u for u in value.users if u not in inside]
            if not users:
                continue
            row = emit("call_function", torch.select, (stacked, 0, r))
            for dim, size in cuts[r][k] if cuts else ():
                row = emit("call_method", "narrow", (row, dim, 0, size))
            if any(u.op == "output" or mutated_input(u, gm) is value for u in users):
                row = emit("call_method", "clone", (row,))   # a tensor of its own, as before
            value.replace_all_uses_with(row, delete_user_cb=lambda u: u not in inside)


def _erase(graph: fx.Graph, plan: RowPlan) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(plan.nodes(), key=order.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)


def _place(gm: fx.GraphModule, block: list[fx.Node]) -> None:
    """Move the new nodes up to just before the first node that uses them, with the
    (pure) nodes they need that come later: every old node keeps its place, so views and
    in-place writes stay in their order (autograd cares). When a needed node writes in
    place, the block stays where it is and :func:`repair_order` moves users down."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    inside = set(block)
    users = [u for n in block for u in n.users if u not in inside]
    if not users:
        return
    first = min(users, key=order.__getitem__)
    needed = _needed_after(block, first, order)
    if any(mutated_input(n, gm) is not None or n.op in ("placeholder", "output")
           or n.is_impure() for n in needed):
        return
    for node in sorted(needed, key=order.__getitem__) + block:
        first.prepend(node)


def _needed_after(block: list[fx.Node], first: fx.Node, order: dict[fx.Node, int]
                  ) -> set[fx.Node]:
    """The old nodes the block needs that come after ``first``."""
    inside, needed, stack = set(block), set(), list(block)
    while stack:
        for dep in stack.pop().all_input_nodes:
            if dep not in inside and dep not in needed and order[dep] > order[first]:
                needed.add(dep)
                stack.append(dep)
    return needed


def repair_order(graph: fx.Graph) -> None:
    """Move a node that uses a later one (a row's value used before the last row ran)
    to just after its last input, keeping every other node where it was."""
    changed = True
    while changed:
        changed = False
        order = {n: i for i, n in enumerate(graph.nodes)}
        for node in list(graph.nodes):
            late = [d for d in node.all_input_nodes if order[d] > order[node]]
            if late:
                max(late, key=order.__getitem__).append(node)
                changed = True
                break
