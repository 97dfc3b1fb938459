"""Split the tensors a join reads into rows: the nodes only one of them depends on.

Given the H tensors a ``cat`` / ``stack`` / sum / buffer write joins, one backward pass
marks every node with the row whose result it feeds, or with *shared* when it feeds
more than one. A row's nodes are the ones marked with it alone; what a row reads from
outside itself (the source tensor, a shared size, a shared module's weights) is
*external*. A row whose result another row reads is loop-carried.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

SHARED = -1


@dataclass(frozen=True)
class RowSplit:
    """The rows behind H joined tensors.

    Attributes:
        outputs: per row, the joined tensor (the row's result).
        bodies: per row, the row's own nodes, in graph order.
        carried: ``(i, j)`` pairs: row ``j``'s result feeds row ``i`` (loop-carried).
    """

    outputs: tuple[fx.Node, ...]
    bodies: tuple[tuple[fx.Node, ...], ...]
    carried: tuple[tuple[int, int], ...]


def split_rows(outputs: list[fx.Node], order: list[fx.Node],
               deps: dict[fx.Node, list[fx.Node]],
               writers: dict[fx.Node, list[fx.Node]] | None = None) -> RowSplit:
    """Mark the nodes behind each output with its row, or *shared*.

    Args:
        outputs: the joined tensors, one per row.
        order: the graph's nodes in order.
        deps: per node, what it depends on (:func:`graphfacts.dependencies`).
        writers: per node, the in-place ops that write into it: they belong to the
            row of the tensor they write.
    """
    mark = _mark(outputs, deps, writers or {})
    bodies: list[list[fx.Node]] = [[] for _ in outputs]
    for node in order:
        row = mark.get(node, SHARED)
        if row != SHARED and node.op not in ("placeholder", "output"):
            bodies[row].append(node)
    carried = tuple((i, j) for j, out in enumerate(outputs) if mark.get(out) == SHARED
                    for i, other in enumerate(outputs) if i != j and _feeds(out, other, deps))
    return RowSplit(tuple(outputs), tuple(tuple(b) for b in bodies), carried)


def _mark(outputs: list[fx.Node], deps: dict[fx.Node, list[fx.Node]],
          writers: dict[fx.Node, list[fx.Node]]) -> dict[fx.Node, int]:
    """Per node behind the outputs, its row, or :data:`SHARED` (a work list: marks only
    go from unset to a row to shared, so it ends)."""
    mark: dict[fx.Node, int] = {}
    for row, node in enumerate(outputs):
        mark[node] = row if node not in mark else SHARED
    work = list(mark)
    while work:
        node = work.pop()
        row = mark[node]
        for dep in (*deps[node], *writers.get(node, ())):
            seen = mark.get(dep)
            new = row if seen is None or seen == row else SHARED
            if new != seen:
                mark[dep] = new
                work.append(dep)
    return mark


def _feeds(source: fx.Node, target: fx.Node, deps: dict[fx.Node, list[fx.Node]]) -> bool:
    """``target`` depends on ``source``."""
    stack, seen = [target], set()
    while stack:
        node = stack.pop()
        if node is source:
            return True
        if node in seen:
            continue
        seen.add(node)
        stack.extend(deps[node])
    return False


def externals(body: tuple[fx.Node, ...]) -> list[fx.Node]:
    """What a row reads from outside itself, in first-use order."""
    inside, seen, found = set(body), set(), []
    for node in body:
        for dep in node.all_input_nodes:
            if dep not in inside and dep not in seen:
                seen.add(dep)
                found.append(dep)
    return found


def leaks(body: tuple[fx.Node, ...]) -> list[fx.Node]:
    """The row's nodes used outside the row (its result and any value exported)."""
    inside = set(body)
    return [n for n in body if any(u not in inside for u in n.users)]
