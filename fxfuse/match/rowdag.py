"""Rows that are small DAGs, not chains: a gated residual block per row
(``norm_h(glu_h(fc2_h(elu(fc1_h(x_h)))) + skip_h(x_h))``), a GLU gate
(``sigmoid(a_h(y)) * b_h(y)``). Every node is a per-row op of a known kind, ops with two
per-row operands included (:mod:`.kinds.binary`); the row reads one input and its
intermediate values are used only inside the row. Rows with the same ops, wired the
same way, fuse into one batched DAG: each op once, on the fused values of its operands.
"""
from __future__ import annotations

from torch import fx, nn

from .kinds import RowOp, row_op

ROW_INPUT = -1     # in ``RowChain.links``: the operand is the row's input


def op_operands(op: RowOp) -> tuple[fx.Node, ...]:
    """The per-row tensors ``op`` reads: both operands of a binary op, else its input."""
    if op.kind == "binary":
        return tuple(op.node.args)     # two fx.Nodes (checked when recognised)
    return (op.input,)


def row_dag(out: fx.Node, root: nn.Module) -> tuple[tuple[RowOp, ...], fx.Node] | None:
    """The per-row ops of the DAG ending at ``out`` in graph order, and the row's one
    input; None when the ops reached read more than one tensor from outside (a value
    carried from another row, a second input)."""
    ops = _reach(out, root, None)
    while True:    # an intermediate also read outside the row ends the row there
        private = {n: op for n, op in ops.items()
                   if n is out or all(u in ops for u in n.users)}
        kept = _reach(out, root, private)
        if len(kept) == len(ops):
            break
        ops = kept
    leaves = {a for op in ops.values() for a in op_operands(op) if a not in ops}
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    first = min(leaves, key=order.__getitem__, default=None)
    if first is None or not all(same_value(leaf, first) for leaf in leaves):
        return None
    return tuple(ops[n] for n in sorted(ops, key=order.__getitem__)), first


def same_value(a: object, b: object, depth: int = 8) -> bool:
    """True when ``a`` and ``b`` compute the same value: the same node, or the same
    side-effect-free call on the same arguments (``x[:, :, h]`` written twice in a row)."""
    if a is b:
        return True
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return _same_plain(a, b, depth)
    if not _comparable_calls(a, b, depth):
        return False
    return same_value(tuple(a.args), tuple(b.args), depth - 1) and all(
        same_value(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs)


def _same_plain(a: object, b: object, depth: int) -> bool:
    """:func:`same_value` when one side is not a node: equal sequences or equal constants."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y, depth) for x, y in zip(a, b))
    return type(a) is type(b) and not isinstance(a, fx.Node) and a == b


def _comparable_calls(a: fx.Node, b: fx.Node, depth: int) -> bool:
    """True when two nodes are the same pure call with the same keywords (depth left)."""
    return not (depth == 0 or a.op != b.op or a.target != b.target or a.op not in (
        "call_function", "call_method") or a.kwargs.keys() != b.kwargs.keys() or
        a.is_impure() or b.is_impure())


def row_leaves(ops: list[RowOp]) -> set[fx.Node]:
    """The nodes a row's ops read from outside the row (its input, written once or more)."""
    inside = {op.node for op in ops}
    return {a for op in ops for a in op_operands(op) if a not in inside}


def _reach(out: fx.Node, root: nn.Module, allowed: dict[fx.Node, RowOp] | None
           ) -> dict[fx.Node, RowOp]:
    """Row ops reachable back from ``out`` through row ops (within ``allowed``)."""
    found: dict[fx.Node, RowOp] = {}
    pending = [out]
    while pending:
        node = pending.pop()
        if node in found:
            continue
        op = row_op(node, root) if allowed is None else allowed.get(node)
        if op is None:
            continue
        found[node] = op
        pending.extend(op_operands(op))
    return found


def links(ops: tuple[RowOp, ...], row_input: fx.Node) -> tuple[tuple[int, ...], ...]:
    """Per op, where each operand comes from: the position of an earlier op, or
    :data:`ROW_INPUT`. Rows with equal links are wired the same way."""
    where = {op.node: i for i, op in enumerate(ops)}
    return tuple(tuple(where.get(a, ROW_INPUT) for a in op_operands(op)) for op in ops)
