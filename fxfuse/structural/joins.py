"""After the splice every row's value is ``stacked[r]``; give the joins back their shape.

- ``cat([stacked[0], ..., stacked[H-1]], d)`` (a run of them, in order, anywhere in the
  list) is ``stacked.movedim(0, d).flatten(d, d + 1)``;
- ``stack([...all of them...], d)`` is ``stacked.movedim(0, d)``;
- a sum of all of them (``a + b + ...``, Python's ``sum``) is ``stacked.sum(0)``.

Rows padded to one size read ``stacked[r].narrow(d, 0, size_r)``; a ``cat`` of all of
them on ``d`` is ``stacked.movedim(0, d).flatten(d, d + 1).index_select(d, kept)``, with
``kept`` the positions that are no padding (a buffer of ``holder``).

Each result is made contiguous, as the join it replaces was. Other joins keep reading
``stacked[r]``, which is correct, only not as fast.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

_CATS = {torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default}
_STACKS = {torch.stack, torch.ops.aten.stack.default}
_ADDS = {operator.add, torch.add, torch.ops.aten.add.Tensor}


def _row_of(node: fx.Node, stacked: fx.Node) -> int | None:
    if node.op == "call_function" and node.target is torch.select and node.args[0] is stacked \
            and node.args[1] == 0:
        return int(node.args[2])
    return None


def _cut_row_of(node: fx.Node, stacked: fx.Node) -> tuple[int, int, int] | None:
    """``(row, dim, size)`` of ``stacked[row].narrow(dim, 0, size)`` (``size`` -1: the
    whole row, no narrow)."""
    if node.op == "call_method" and node.target == "narrow" and len(node.args) == 4 \
            and node.args[2] == 0 and isinstance(node.args[0], fx.Node):
        row = _row_of(node.args[0], stacked)
        return None if row is None else (row, int(node.args[1]), int(node.args[3]))
    row = _row_of(node, stacked)
    return None if row is None else (row, -1, -1)


def _join_args(node: fx.Node) -> tuple[list, int]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return list(tensors), dim


def _ndim(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta") or node.meta.get("val")
    shape = getattr(meta, "shape", None)
    return None if shape is None else len(shape)


def restore_joins(graph: fx.Graph, stacked: fx.Node, rows: int, row_ndim: int,
                  holder: torch.nn.Module | None = None, holder_path: str = "") -> None:
    """Rewrite the joins of ``stacked``'s rows (see the module docstring; ``holder`` at
    ``holder_path`` keeps the index of a padded rows' ``cat``)."""
    users = _row_users(stacked)
    for user in list(users):
        if user.op != "call_function" or user.graph is not graph:
            continue
        if user.target in _CATS and not _cat(graph, user, stacked, rows, row_ndim) \
                and holder is not None:
            _padded_cat(graph, user, stacked, rows, row_ndim, holder, holder_path)
        elif user.target in _STACKS:
            _stack(graph, user, stacked, rows, row_ndim)
    for user in list(users):
        if user.op == "call_function" and user.target in _ADDS and user.graph is graph:
            _sum(graph, user, stacked, rows)


def _row_users(stacked: fx.Node) -> set[fx.Node]:
    """The users of the rows ``stacked[r]`` (and of their narrowed, padded, forms)."""
    users = {u for s in stacked.users if _row_of(s, stacked) is not None for u in s.users}
    return users | {v for u in users if u.op == "call_method" and u.target == "narrow"
                    for v in u.users}


def _cat(graph: fx.Graph, node: fx.Node, stacked: fx.Node, rows: int, ndim: int) -> None:
    tensors, dim = _join_args(node)
    found = [_row_of(t, stacked) if isinstance(t, fx.Node) else None for t in tensors]
    for start in range(len(tensors) - rows + 1):
        if found[start:start + rows] == list(range(rows)):
            d = dim % ndim
            with graph.inserting_before(node):
                moved = graph.call_method("movedim", (stacked, 0, d))
                flat = graph.call_method("flatten", (moved, d, d + 1))
            rest = tensors[:start] + [flat] + tensors[start + rows:]
            if len(rest) == 1:
                with graph.inserting_before(node):
                    whole = graph.call_method("contiguous", (flat,))
                node.replace_all_uses_with(whole)
                graph.erase_node(node)
            else:
                node.args = (rest, dim)
                node.kwargs = {}
            return True
    return False


def _padded_cat(graph: fx.Graph, node: fx.Node, stacked: fx.Node, rows: int, ndim: int,
                holder: torch.nn.Module, path: str) -> None:
    tensors, dim = _join_args(node)
    d = dim % ndim
    found = [_cut_row_of(t, stacked) if isinstance(t, fx.Node) else None for t in tensors]
    meta = stacked.meta.get("val")
    if meta is None:
        return
    width = int(meta.shape[d + 1])
    for start in range(len(tensors) - rows + 1):
        run = found[start:start + rows]
        if not _padded_run(run, rows, d):
            continue
        kept = torch.cat([torch.arange(r * width, r * width + (width if size < 0 else size))
                          for r, _, size in run])
        name = f"cat_index_{len([k for k in holder._buffers if k.startswith('cat_index')])}"
        holder.register_buffer(name, kept.to(meta.device), persistent=False)
        with graph.inserting_before(node):
            index = graph.get_attr(f"{path}.{name}")
            moved = graph.call_method("movedim", (stacked, 0, d))
            flat = graph.call_method("flatten", (moved, d, d + 1))
            picked = graph.call_method("index_select", (flat, d, index))
        rest = tensors[:start] + [picked] + tensors[start + rows:]
        if len(rest) == 1:
            node.replace_all_uses_with(picked)
            graph.erase_node(node)
        else:
            node.args = (rest, dim)
            node.kwargs = {}
        return


def _padded_run(run: list, rows: int, dim: int) -> bool:
    """``run`` is every row in order, each whole or narrowed on ``dim`` alone."""
    return None not in run and [f[0] for f in run] == list(range(rows)) and \
        all(f[1] in (-1, dim) for f in run)


def _stack(graph: fx.Graph, node: fx.Node, stacked: fx.Node, rows: int, ndim: int) -> None:
    tensors, dim = _join_args(node)
    found = [_row_of(t, stacked) if isinstance(t, fx.Node) else None for t in tensors]
    if found != list(range(rows)):
        return
    with graph.inserting_before(node):
        moved = graph.call_method("movedim", (stacked, 0, dim % (ndim + 1)))
        whole = graph.call_method("contiguous", (moved,))
    node.replace_all_uses_with(whole)
    graph.erase_node(node)


def _sum(graph: fx.Graph, node: fx.Node, stacked: fx.Node, rows: int) -> None:
    root = node
    while len(root.users) == 1:
        (up,) = root.users
        if up.op != "call_function" or up.target not in _ADDS or up.kwargs:
            break
        root = up
    leaves: list[int] = []
    if not _leaves(root, stacked, leaves, top=True) or sorted(leaves) != list(range(rows)):
        return
    with graph.inserting_before(root):
        total = graph.call_method("sum", (stacked, 0))
    root.replace_all_uses_with(total)


def _leaves(node, stacked: fx.Node, out: list[int], top: bool = False) -> bool:
    if isinstance(node, (int, float)) and node == 0:
        return True
    if not isinstance(node, fx.Node):
        return False
    row = _row_of(node, stacked)
    if row is not None:
        out.append(row)
        return True
    if node.op != "call_function" or node.target not in _ADDS or node.kwargs or len(node.args) != 2:
        return False
    if not top and len(node.users) != 1:
        return False
    return all(_leaves(a, stacked, out) for a in node.args)
