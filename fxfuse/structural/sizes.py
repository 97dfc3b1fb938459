"""Rows that are the same code but for one size: which rows may share one padded loop.

Rows whose signatures differ only in sizes (:func:`signature.row_signature` with
``sized=False``) are candidates. They pad when, at every parameter position, the rows'
tensors differ along one axis at most (``nn.Linear(d, k[i])``: the weight's dim 0 and the
bias's; ``nn.Embedding(card[i], d)``: the table's dim 0), and every configuration
attribute that differs only records such a size (``out_features``, ``num_embeddings``).
Whether padding is then exact is checked on values (:mod:`padding`), not decided here.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .signature import is_size


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, torch.nn.Module):
        return [*(p for _, p in value.named_parameters(remove_duplicate=False)),
                *(b for _, b in value.named_buffers(remove_duplicate=False))]
    return []


def varying_axis(shapes: list[tuple[int, ...]]) -> int | None:
    """The one axis along which ``shapes`` (of one rank) differ, ``None`` when they are
    equal; -1 when they differ along more than one axis."""
    axes = [a for a in range(len(shapes[0])) if len({s[a] for s in shapes}) > 1]
    if len(axes) > 1:
        return -1
    return axes[0] if axes else None


def _sizes(per_row: list[list[torch.Tensor]]) -> list[set[int]] | None:
    """Per row, the sizes along the varying axes of its tensors; ``None`` when some
    tensor differs along more than one axis."""
    sizes: list[set[int]] = [set() for _ in per_row]
    for k in range(len(per_row[0])):
        shapes = [tuple(row[k].shape) for row in per_row]
        axis = varying_axis(shapes)
        if axis == -1:
            return None
        if axis is not None:
            for r, shape in enumerate(shapes):
                sizes[r].add(shape[axis])
    return sizes


def _flat(value: Any) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _config_follows(modules: list[torch.nn.Module], sizes: list[set[int]]) -> bool:
    """Every attribute that differs between the rows' modules is a size, and where it
    differs it holds one of the row's varying tensor sizes."""
    for subs in zip(*(dict(m.named_modules()).values() for m in modules)):
        for key, first in vars(subs[0]).items():
            values = [vars(s).get(key) for s in subs]
            if not key.startswith("_") and any(v != first for v in values) and \
                    not _records_sizes(values, sizes):
                return False
    return True


def _records_sizes(values: list[Any], sizes: list[set[int]]) -> bool:
    """Per row, one attribute's value: sizes of one length, each entry that differs
    between rows one of that row's varying tensor sizes."""
    if not all(is_size(v) for v in values) or len({len(_flat(v)) for v in values}) > 1:
        return False
    flat = [_flat(v) for v in values]
    return all(len({f[j] for f in flat}) == 1 or all(f[j] in s for f, s in zip(flat, sizes))
               for j in range(len(flat[0])))


def pads(bodies: tuple[tuple[fx.Node, ...], ...], rows: list[int], gm: fx.GraphModule) -> bool:
    """The rows differ only in sizes that padding their tensors to the largest covers."""
    for nodes in zip(*(bodies[r] for r in rows)):
        if nodes[0].op not in ("call_module", "get_attr"):
            continue
        values = [_lookup(gm, str(n.target)) for n in nodes]
        per_row = [_tensors(v) for v in values]
        if len({len(t) for t in per_row}) > 1:
            return False
        sizes = _sizes(per_row)
        if sizes is None:
            return False
        if nodes[0].op == "call_module" and not _config_follows(values, sizes):
            return False
    return True


def _lookup(gm: fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)
