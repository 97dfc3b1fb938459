"""Solve where each element goes, by running the loop's indexing on index tensors.

The many spellings of a row loop (``x[:, :, h]``, ``select``, ``unbind``, ``split`` +
``squeeze``, ``chunk``, ``narrow``, keep-dim slices, ``unsqueeze`` + ``cat``,
``stack``, writes into a buffer) all only move elements. Running those same graph
nodes on ``arange`` tensors tells exactly which source element each row reads and
where each row's output lands; the layout is then matched against the few forms the
rewrite can emit. No spelling is special-cased.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Sequence

import torch
from torch.utils import _pytree as pytree
from torch import fx

from .sites import InputPlan, OutputPlan
from ..trace.tracing import VALUE_KEY


class LayoutError(Exception):
    """Internal: the region cannot be evaluated or matches no supported layout."""


def index_tensor(shape: Sequence[int]) -> torch.Tensor:
    """``arange`` shaped like ``shape``: element value = its flat position."""
    numel = 1
    for s in shape:
        numel *= int(s)
    dtype = torch.int32 if numel < 2**31 - 1 else torch.int64
    return torch.arange(numel, dtype=dtype).view(tuple(shape))


def _value(arg: Any, env: dict[fx.Node, Any]) -> Any:
    if arg in env:
        return env[arg]
    if VALUE_KEY in arg.meta:
        return arg.meta[VALUE_KEY]
    raise LayoutError(f"node {arg.name} is not part of the loop's indexing")


def evaluate(nodes: Iterable[fx.Node], env: dict[fx.Node, Any]) -> dict[fx.Node, Any]:
    """Run ``nodes`` (in graph order) with the tensors in ``env`` substituted."""
    for node in nodes:
        args = fx.node.map_arg(node.args, lambda a: _value(a, env))
        kwargs = dict(fx.node.map_arg(node.kwargs, lambda a: _value(a, env)))
        kwargs.pop("pin_memory", None)
        args, kwargs = _on_cpu(args), _on_cpu(kwargs)       # index tensors live on the CPU
        try:
            if node.op == "call_module":        # nn.Flatten / nn.Unflatten
                env[node] = node.graph.owning_module.get_submodule(str(node.target))(*args)
            elif node.op == "call_method":
                method = "cpu" if node.target == "cuda" else str(node.target)
                env[node] = getattr(args[0], method)(*args[1:], **kwargs)
            else:
                env[node] = node.target(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure means "not a plain layout"
            raise LayoutError(f"{node.name}: {exc}") from exc
    return env


def _on_cpu(value: Any) -> Any:
    """``value`` with every device moved to the CPU (a model on a GPU allocates its
    buffers there; the index tensors that stand in for its data are on the CPU)."""
    def cpu(v: Any) -> Any:
        if isinstance(v, torch.device) or (isinstance(v, str) and v.split(":")[0] in
                                           ("cuda", "mps", "xpu", "meta")):
            return torch.device("cpu")
        if isinstance(v, torch.Tensor) and v.device.type != "cpu":
            return v.cpu()
        return v
    return pytree.tree_map(cpu, value)


def _orders(items: Sequence[int]) -> list[tuple[int, ...]]:
    """Every order of ``items``, fewest swaps first, so size-1 ambiguities resolve to the
    plain layout."""
    return sorted(itertools.permutations(items), key=lambda p: sum(
        1 for i in range(len(p)) for j in range(i + 1, len(p)) if p[i] > p[j]))


def _axis_orders(ndim: int, row_axis: int) -> list[tuple[int, ...]]:
    return _orders([a for a in range(ndim) if a != row_axis])


def solve_input(source_shape: Sequence[int], rows: Sequence[torch.Tensor]) -> InputPlan:
    """Find the :class:`InputPlan` under which ``rows[h]`` (index tensors) are read.

    Rows of shape (N, C, ...) are either whole rows of a source with one more dim
    (``"select"``) or blocks of C consecutive channels of a source of the same rank
    (``"block"``).

    Raises:
        LayoutError: the rows are not plain rows or channel blocks of the source.
    """
    src = index_tensor(source_shape)
    shape = rows[0].shape
    if any(r.shape != shape for r in rows) or len(shape) < 2:
        raise LayoutError("rows are not (batch, channels, ...) slices of one shape")
    ndim = len(source_shape)
    if ndim == len(shape) + 1:
        kind = "select"
    elif ndim == len(shape):
        kind = "block"
    else:
        plan = _try_reshaped(src, rows, shape)
        if plan is None:
            raise LayoutError(f"{len(shape)}-D rows come from a {ndim}-D tensor")
        return plan
    for row_axis in range(ndim):
        for rest in _axis_orders(ndim, row_axis):
            axes = (rest[0], row_axis, *rest[1:])
            plan = _try_axes(kind, src.permute(axes), axes, rows, shape)
            if plan is not None:
                return plan
    plan = _try_reshaped(src, rows, shape)
    if plan is None:
        raise LayoutError("rows are not whole rows or channel blocks of the source")
    return plan


def _try_reshaped(src: torch.Tensor, rows: Sequence[torch.Tensor], shape: torch.Size
                  ) -> InputPlan | None:
    """Rows that are whole rows of the source with their non-batch dims merged or split
    (``nn.Flatten(start_dim=-2)``, ``x[:, i].reshape(B, -1)``): a layout op applied once
    to all rows. The batch dim must stay whole and first."""
    ndim, row_numel = src.dim(), 1
    for s in shape[1:]:
        row_numel *= int(s)
    if ndim < 3:
        return None
    for row_axis in range(ndim):
        for rest in _axis_orders(ndim, row_axis):
            axes = (rest[0], row_axis, *rest[1:])
            view = src.permute(axes)
            if view.shape[0] != shape[0] or view[0, 0].numel() != row_numel:
                continue
            plan = _try_axes("select", view.reshape(shape[0], view.shape[1], *shape[1:]), axes,
                             rows, shape)
            if plan is not None:
                return dataclasses.replace(plan, row_shape=tuple(int(s) for s in shape[1:]))
    return None


def solve_feature_input(source_shape: Sequence[int], rows: Sequence[torch.Tensor]) -> InputPlan:
    """:func:`solve_input` for rows a ``Linear`` reads: when the rows are not plain rows or
    channel blocks, their *last* axis (the one a Linear reads) may be the block of the
    source (``x[..., i].unsqueeze(-1)``, ``x[:, :, i:i+k]`` of a (B, T, F) input).

    Raises:
        LayoutError: neither reading fits (the first reason is kept).
    """
    try:
        return solve_input(source_shape, rows)
    except LayoutError as first:
        if rows[0].dim() < 3:
            raise
        try:
            plan = solve_input(source_shape, [r.movedim(-1, 1) for r in rows])
        except LayoutError:
            raise first from None
    return dataclasses.replace(plan, feature_last=True)


def _try_axes(kind: str, view: torch.Tensor, axes: tuple[int, ...],
              rows: Sequence[torch.Tensor], shape: torch.Size) -> InputPlan | None:
    if kind == "select":
        if (view.shape[0], *view.shape[2:]) != tuple(shape):
            return None
        starts = []
        for r in rows:
            i = _index_along(view, r)
            if i is None or not torch.equal(view[:, i], r):
                return None
            starts.append(i)
        return InputPlan("select", axes, tuple(starts), int(shape[1]), int(view.shape[1]))
    if (view.shape[0], *view.shape[2:]) != (shape[0], *shape[2:]):
        return None
    width = int(shape[1])
    starts = []
    for r in rows:
        i = _index_along(view, r)
        if i is None or i + width > view.shape[1] or not torch.equal(view[:, i:i + width], r):
            return None
        starts.append(i)
    return InputPlan("block", axes, tuple(starts), width, int(view.shape[1]))


def _index_along(view: torch.Tensor, row: torch.Tensor) -> int | None:
    """Position along dim 1 of ``view`` where ``row``'s first element sits."""
    if row.numel() == 0:
        return None
    first = row.reshape(-1)[0]
    hits = (view.select(0, 0) == first).nonzero()
    if hits.numel() == 0:
        return None
    return int(hits[0, 0])


def solve_output(rows_shape: Sequence[int], result: torch.Tensor) -> OutputPlan:
    """Find the :class:`OutputPlan` that turns ``F`` (rows stacked on dim 1) into ``result``.

    Raises:
        LayoutError: ``result`` leaves elements unwritten or mixes them differently.
    """
    fidx = index_tensor(rows_shape)
    if result.numel() != fidx.numel() or bool((result < 0).any()):
        raise LayoutError("the combined tensor holds more than the rows (or leaves parts unwritten)")
    target = tuple(result.shape)
    for perm in _orders(range(len(rows_shape))):
        permuted = fidx.permute(perm)
        merge = _merge_runs(tuple(permuted.shape), target)
        if merge is not None and torch.equal(permuted.reshape(target), result):
            return OutputPlan(tuple(perm), merge)
    raise LayoutError("rows are combined in an order the rewrite does not produce")


def _merge_runs(shape: tuple[int, ...], target: tuple[int, ...]) -> tuple[int, ...] | None:
    """How many consecutive dims of ``shape`` flatten into each dim of ``target`` (None if
    ``target`` is not such a flattening)."""
    runs, i = [], 0
    for want in target:
        prod, count = 1, 0
        while i < len(shape) and (count == 0 or prod < want):
            prod *= shape[i]
            count += 1
            i += 1
        if prod != want or count == 0:      # every target dim takes at least one dim
            return None
        runs.append(count)
    while i < len(shape) and shape[i] == 1 and runs:
        runs[-1] += 1
        i += 1
    return tuple(runs) if i == len(shape) else None
