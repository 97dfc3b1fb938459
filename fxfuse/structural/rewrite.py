"""Rewrite one planned loop: splice its vectorised body, restore its joins, map its weights."""
from __future__ import annotations

from torch import fx

from ..weightmap import WeightEntry, WeightMap
from .body import StackedTensor
from .find import Loop
from .joins import restore_joins
from .splice import attr_name, holder_module, repair_order, splice


def free_name(gm: fx.GraphModule, stem: str) -> str:
    """``stem``, ``stem_1``, ... whichever is not yet an attribute of ``gm``."""
    name, k = stem, 0
    while hasattr(gm, name):
        k += 1
        name = f"{stem}_{k}"
    return name


def rewrite_loop(gm: fx.GraphModule, loop: Loop) -> WeightMap:
    """Replace ``loop``'s rows in ``gm`` by its vectorised body (in place).

    Returns:
        The weight map entries: each fused tensor is its rows' tensors stacked on dim 0.
    """
    holder = free_name(gm, "fused_rows")
    gm.add_submodule(holder, holder_module(loop.row))
    outputs = splice(gm, loop.plan, loop.body, loop.row, loop.reads, holder, loop.batch_source,
                     loop.cuts, loop.bounds)
    for stacked, ndim in zip(outputs, loop.row_ndims):
        restore_joins(gm.graph, stacked, loop.plan.size, ndim, gm.get_submodule(holder), holder)
    repair_order(gm.graph)
    gm.graph.eliminate_dead_code()
    entries = tuple(_entry(f"{holder}.{attr_name(s.name)}", s)
                    for s in loop.row.stacked if s.persistent)
    return WeightMap(entries)


def _entry(key: str, s: StackedTensor) -> WeightEntry:
    """A ``stack`` entry; padded parts carry their windows (offset 0, own size)."""
    if s.pad_dim is None:
        return WeightEntry(key, s.parts, 0, None, "stack")
    return WeightEntry(key, s.parts, 0, None, "stack", tuple((0, n) for n in s.sizes),
                       s.pad_dim)
