"""Indices into stacked tables: keep each row's own bound.

A row that indexes a table (``nn.Embedding(card[i], d)``, ``table[idx]``) raises on an
index past its own table. Fused, the same index would read the padding (rows padded to
the largest table) or, once vmap offsets the rows into one table, the next row's table
(``-1``: the previous row's), even when every table has the same size. So, per integer
input of the rows, the bound is found by running each row alone with its own tensors:
with every index set to one of its tensors' sizes it raises, one less it runs.
Such an input is then guarded in the fused loop: an index outside ``[0, bound)`` of its
row is replaced by one past every table, so the fused lookup raises as the row did.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from .body import RowFunction
from .plan import Refused


@dataclass(frozen=True)
class Bound:
    """Input ``slot``'s indices must lie in ``[0, limits[r])`` for row ``r`` (``wraps``:
    in ``[-limits[r], limits[r])``, rows that read ``-1`` as their table's last entry)."""

    slot: int
    limits: tuple[int, ...]
    wraps: bool = False

    def outside(self, dtype: torch.dtype) -> int:
        """An index past every table, with room to be offset by vmap."""
        return torch.iinfo(dtype).max // 2


def _raises(row: RowFunction, r: int, weights: dict[str, torch.Tensor], args: list[Any],
            slot: int, fill: int, own: bool) -> bool:
    tensors = {k: weights[path] for k, path in row.shared.items()}
    tensors.update({s.name: (s.part(r) if own else s.value[r]).clone() for s in row.stacked})
    given = list(args)
    given[slot] = torch.full_like(args[slot], fill)
    try:
        with torch.no_grad():
            functional_call(row.module, tensors, tuple(given))
    except (IndexError, RuntimeError):
        return True
    return False


def _limit(row: RowFunction, r: int, weights, args: list[Any], slot: int
           ) -> tuple[int, bool] | None:
    """The row's bound on input ``slot``: one of the sizes of its own stacked tensors that
    it raises at and runs one below. Fused, any such index would read elsewhere (the
    padding, or the next row's table once vmap offsets the rows into one table)."""
    sizes = sorted({n for s in row.stacked for n in s.part(r).shape if n > 0})
    for size in sizes:
        if _raises(row, r, weights, args, slot, size, True) and \
                not _raises(row, r, weights, args, slot, size - 1, True):
            wraps = not _raises(row, r, weights, args, slot, -1, True)
            if wraps and any(s.pad_dim is not None for s in row.stacked):
                raise Refused("a row reads its table with negative indices, which a padded "
                              "table would read elsewhere")
            return size, wraps
    return None


def find_bounds(row: RowFunction, args: list[list[Any]], weights: dict[str, torch.Tensor]
                ) -> tuple[Bound, ...]:
    """The guarded inputs of the rows (``args``: per row, the row's example arguments)."""
    bounds = []
    for slot in range(len(args[0])):
        values = [a[slot] for a in args]
        if not all(isinstance(v, torch.Tensor) and not v.is_floating_point()
                   and not v.is_complex() and v.dtype != torch.bool for v in values):
            continue
        limits = [_limit(row, r, weights, args[r], slot) for r in range(len(args))]
        if any(x is not None for x in limits):
            top = torch.iinfo(values[0].dtype).max
            bounds.append(Bound(slot, tuple(top if x is None else x[0] for x in limits),
                                any(x is not None and x[1] for x in limits)))
    return tuple(bounds)
