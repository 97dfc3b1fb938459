"""Where rows are joined: the places a loop's results meet.

A join is any node that takes a list of tensors (``cat``, ``stack``, a tuple or dict
output, ``sum(list)``), a tree of additions (``a + b + c``, Python's ``sum``), or the
writes into one preallocated tensor (``out[:, i] = ...``). Its tensors, deduplicated,
are the candidate rows; which of them are the same code is decided later.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .graphfacts import written_values

_ADDS = {operator.add, torch.add, torch.ops.aten.add.Tensor}


@dataclass(frozen=True)
class Join:
    """``node`` joins ``tensors`` (the ``kind`` says how, for the report)."""

    node: fx.Node
    kind: str
    tensors: tuple[fx.Node, ...]


def _unique(nodes) -> tuple[fx.Node, ...]:
    seen: dict[fx.Node, None] = {}
    for n in nodes:
        if isinstance(n, fx.Node) and n.op != "get_attr":
            seen.setdefault(n, None)
    return tuple(seen)


def _kind(node: fx.Node) -> str:
    if node.op == "output":
        return "outputs"
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]


def find_joins(gm: fx.GraphModule, min_rows: int) -> list[Join]:
    """Every join of at least ``min_rows`` tensors, in graph order."""
    joins: list[Join] = []
    for node in gm.graph.nodes:
        for arg in (*node.args, *node.kwargs.values()):
            values = arg.values() if isinstance(arg, dict) else arg
            if isinstance(values, (list, tuple)) or isinstance(arg, dict):
                tensors = _unique(values)
                if len(tensors) >= min_rows:
                    joins.append(Join(node, _kind(node), tensors))
        if _is_sum_root(node):
            leaves = _unique(_add_leaves(node))
            if len(leaves) >= min_rows:
                joins.append(Join(node, "sum", leaves))
    for base, values in written_values(gm).items():
        tensors = _unique(values)
        if len(tensors) >= min_rows:
            joins.append(Join(base, "buffer", tensors))
    return joins


def _is_add(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ADDS \
        and not node.kwargs and len(node.args) == 2


def _is_sum_root(node: fx.Node) -> bool:
    return _is_add(node) and not (len(node.users) == 1 and _is_add(next(iter(node.users))))


def _add_leaves(node: fx.Node) -> list[fx.Node]:
    leaves, stack = [], [node]
    while stack:
        n = stack.pop()
        if _is_add(n) and (n is node or len(n.users) == 1):
            stack.extend(reversed(n.args))
        elif isinstance(n, fx.Node):
            leaves.append(n)
    return leaves
