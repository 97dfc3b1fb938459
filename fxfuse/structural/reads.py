"""How the rows' inputs reach the vectorised body: as a view of the source, or stacked.

The rows' own index ops are run on a probe (the source's element numbers, ``arange``
shaped like it) and the H results compared with a few views of the probe: the rows on
one dim (``x[:, :, i]``, ``x.unbind(2)``) are the source batched on that dim; blocks of
a dim (``x[:, i*w:(i+1)*w]``, ``x.split(w, 1)``, ``x.chunk(H, 1)``) are the source with
that dim unflattened. Any other read is run as written and the H slices stacked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .values import TensorLike


@dataclass(frozen=True)
class RowsRead:
    """How one input slot is batched.

    ``how``: ``"view"`` (``source`` batched on ``in_dim`` after ``unflatten`` when
    ``width`` is set, or ``narrow(in_dim, 0, rows)`` when ``narrow``) or ``"stack"``
    (the H per-row nodes stacked on a new dim 0).
    """

    how: str
    nodes: tuple[fx.Node, ...]
    source: fx.Node | None = None
    in_dim: int = 0
    width: int | None = None
    narrow: bool = False


def _run(node: fx.Node, env: dict[fx.Node, Any], values: dict[fx.Node, Any]) -> Any:
    def value(n: fx.Node) -> Any:
        return env[n] if n in env else values[n]
    args = fx.node.map_arg(node.args, value)
    kwargs = fx.node.map_arg(node.kwargs, value)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _chain(node: fx.Node, values: dict[fx.Node, Any]) -> tuple[fx.Node, list[fx.Node]] | None:
    """The one tensor a reader indexes, and the ops from it to the reader, in order:
    ops between may compute numbers (``w * i``) or pieces (``split``, ``unbind``)."""
    sources, ops, seen = set(), [], set()

    def visit(n: fx.Node) -> bool:
        if n in seen:
            return True
        seen.add(n)
        value = values.get(n, _MISSING)
        if isinstance(value, TensorLike) and n is not node:
            sources.add(n)
            return True
        if value is not _MISSING and n is not node and not _is_container(value):
            return True          # a number recorded at the example batch
        if n.op not in ("call_function", "call_method") or len(ops) > 8:
            return False
        if not all(visit(d) for d in n.all_input_nodes):
            return False
        ops.append(n)
        return True

    if not visit(node) or len(sources) != 1:
        return None
    return next(iter(sources)), ops


_MISSING = object()


def _is_container(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and any(isinstance(v, TensorLike) for v in value)


def plan_read(nodes: tuple[fx.Node, ...], values: dict[fx.Node, Any]) -> RowsRead:
    """A view of the source when the rows' reads are one, else a stack."""
    found = [_chain(n, values) for n in nodes]
    stack = RowsRead("stack", nodes)
    if any(f is None for f in found) or len({f[0] for f in found}) != 1:
        return stack
    src = found[0][0]
    like = values[src]
    probe = torch.arange(torch.Size(like.shape).numel(), dtype=torch.float64).reshape(like.shape)
    try:
        rows = []
        for _, ops in found:
            env: dict[fx.Node, Any] = {src: probe}
            for op in ops:
                env[op] = _run(op, env, values)
            rows.append(env[ops[-1]])
        read = torch.stack(rows)
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError):
        return stack
    return _matching_view(probe, read, nodes, src) or stack


def _matching_view(probe: torch.Tensor, read: torch.Tensor, nodes, src) -> RowsRead | None:
    rows = read.shape[0]
    for dim in range(1, probe.dim()):
        size = probe.shape[dim]
        candidates = []
        if size == rows:
            candidates.append((probe.movedim(dim, 0), None, False))
        elif size > rows:
            candidates.append((probe.narrow(dim, 0, rows).movedim(dim, 0), None, True))
        if size % rows == 0:
            width = size // rows
            candidates.append((probe.unflatten(dim, (rows, width)).movedim(dim, 0), width, False))
        for view, width, narrow in candidates:
            if view.shape == read.shape and torch.equal(view, read):
                return RowsRead("view", nodes, src, dim, width, narrow)
    return None


def example_of(read: RowsRead, values: dict[fx.Node, Any]) -> TensorLike:
    """The batched input's facts (shape, strides, dtype) for tracing."""
    if read.how == "stack":
        one = values[read.nodes[0]]
        shape = (len(read.nodes), *one.shape)
        return TensorLike(shape, tuple(torch.empty(shape, device="meta").stride()),
                          one.dtype, one.device)
    src = values[read.source]
    t = torch.empty_strided(src.shape, src.stride, dtype=src.dtype, device="meta")
    t = _view(t, read)
    return TensorLike(tuple(t.shape), tuple(t.stride()), src.dtype, src.device)


def _view(t: torch.Tensor, read: RowsRead) -> torch.Tensor:
    if read.narrow:
        return t.narrow(read.in_dim, 0, len(read.nodes))
    if read.width is not None:
        return t.unflatten(read.in_dim, (len(read.nodes), read.width))
    return t
