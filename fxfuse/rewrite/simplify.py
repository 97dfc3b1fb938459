"""Tidy the layout ops the rewrites inserted, so consecutive sites share one layout.

Site 1 ends with ``permute → contiguous`` to give the loop's layout back; site 2 starts
with ``permute → flatten`` to get rows out of it. When nothing else reads the result,
the copy is dropped and the two permutes cancel: the grouped layout flows from one
fused conv into the next with no transpose round trip. Only nodes fxfuse inserted are
touched, so user code that needs a contiguous tensor still gets one.
"""
from __future__ import annotations

from torch import fx

from .rewriter import INSERTED_KEY
from ..match.kinds import row_op
from ..match.ops import reemit

_LAYOUT_METHODS = {"permute", "flatten", "unflatten", "contiguous", "select"}


def _ours(node: fx.Node) -> bool:
    return INSERTED_KEY in node.meta


def _is(node: fx.Node, method: str) -> bool:
    return node.op == "call_method" and node.target == method


def _drop_copies(graph: fx.Graph) -> int:
    removed = 0
    for node in list(graph.nodes):
        if not (_ours(node) and _is(node, "contiguous") and not node.kwargs and node.users):
            continue
        if all(_ours(u) and u.op == "call_method" and u.target in _LAYOUT_METHODS
               and u.args[0] is node for u in node.users):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    return removed


def _merge_permutes(graph: fx.Graph) -> int:
    removed = 0
    for node in list(graph.nodes):
        if not (_ours(node) and _is(node, "permute")):
            continue
        inner = node.args[0]
        if isinstance(inner, fx.Node) and _ours(inner) and _is(inner, "permute") \
                and len(inner.users) == 1:
            outer_perm, inner_perm = node.args[1:], inner.args[1:]
            node.args = (inner.args[0], *[inner_perm[i] for i in outer_perm])
            graph.erase_node(inner)
            removed += 1
        if list(node.args[1:]) == list(range(len(node.args) - 1)):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    return removed


def _layout_chain(node: fx.Node) -> list[fx.Node]:
    """Our permute/contiguous nodes above ``node`` (inclusive), each used only once."""
    chain = []
    while _ours(node) and (_is(node, "permute") or _is(node, "contiguous")) \
            and len(node.users) == 1 and isinstance(node.args[0], fx.Node):
        chain.append(node)
        node = node.args[0]
    return chain


def _hoist_pointwise(gm: fx.GraphModule) -> int:
    """``relu(contiguous(permute(y)))`` read only by our layout ops → ``contiguous(permute(
    relu(y)))``: an elementwise op commutes with moving elements, and after the move the
    layout ops of two sites meet and cancel."""
    graph, moved = gm.graph, 0
    for node in list(graph.nodes):
        op = row_op(node, gm)
        if op is None or op.kind != "pointwise" or op.module is not None and \
                any(True for _ in gm.get_submodule(op.module).parameters()):
            continue
        chain = _layout_chain(op.input)
        users = list(node.users)
        if not chain or not users or not all(_ours(u) and u.op == "call_method"
                                             and u.target in _LAYOUT_METHODS for u in users):
            continue
        base = chain[-1].args[0]
        with graph.inserting_after(base):
            early = reemit(graph, node, op.input, base)
        early.meta[INSERTED_KEY] = chain[-1].meta[INSERTED_KEY]
        chain[-1].replace_input_with(base, early)
        node.replace_all_uses_with(op.input)
        graph.erase_node(node)
        moved += 1
    return moved


def simplify_layout(gm: fx.GraphModule) -> int:
    """Drop the copies and cancel the permutes between consecutive fused sites.

    Returns:
        The number of nodes removed (call ``gm.recompile()`` afterwards).
    """
    removed = _hoist_pointwise(gm)
    return removed + _drop_copies(gm.graph) + _merge_permutes(gm.graph)
