"""Graph-building helpers that matching and rewriting both use: stock modules made
once, loaded with the rows' weights, under names the graph module does not have yet.

Each row-op kind (:mod:`fxfuse.match.kinds`) emits its fused step through these.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from ..match.ops import reemit
from ..match.params import get_tensor, twin_key
from ..weightmap import WeightEntry

REGISTRY_KEY = "fxfuse_fused_modules"   # gm.meta: (variant, twin key) -> module name


def free_name(gm: fx.GraphModule, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``... whichever ``gm`` does not have yet."""
    candidate, i = name, 1
    while hasattr(gm, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def joined(gm: fx.GraphModule, ops: Sequence[Any], role: str, how: str, dim: int = 0
           ) -> torch.Tensor:
    """The rows' tensors playing ``role``, stacked or concatenated on ``dim``."""
    tensors = [get_tensor(gm, op.param(role)).detach() for op in ops]
    return torch.stack(tensors, dim) if how == "stack" else torch.cat(tensors, dim)


def _load(module: nn.Module, gm: fx.GraphModule, ops: Sequence[Any], name: str,
          how: str = "cat", unsqueeze: int | None = None) -> list[WeightEntry]:
    """Copy the rows' tensors into ``module``'s and describe the mapping."""
    entries = []
    with torch.no_grad():
        for role, _ in ops[0].params:
            target = getattr(module, role)
            parts = tuple(op.param(role) for op in ops)
            if role == "num_batches_tracked":
                target.copy_(get_tensor(gm, parts[0]))
                entries.append(WeightEntry(f"{name}.{role}", parts, 0, None, "same"))
                continue
            value = joined(gm, ops, role, how)
            value = value if unsqueeze is None or role != "weight" else value.unsqueeze(unsqueeze)
            if value.shape == target.shape and value.dtype == target.dtype and \
                    value.device == target.device:
                target.set_(value)    # the joined tensor is fresh: hold it, copy nothing
            else:
                target.copy_(value)
            if isinstance(target, nn.Parameter):
                target.requires_grad_(get_tensor(gm, parts[0]).requires_grad)
            entries.append(WeightEntry(f"{name}.{role}", parts, 0,
                                       unsqueeze if role == "weight" else None, how))
    return entries


def fused_module(gm: fx.GraphModule, ops: Sequence[Any], variant: str, prefix: str,
                 build: Callable[[], nn.Module], **load: Any) -> tuple[str, list[WeightEntry]]:
    """The fused module for these rows' weights: made once, and reused when another site
    runs the very same layers (a loop module applied twice), so weights stay tied."""
    registry = gm.meta.setdefault(REGISTRY_KEY, {})
    key = (variant, twin_key(ops))
    if key in registry and hasattr(gm, registry[key]):
        return registry[key], []
    module = build()
    name = free_name(gm, prefix)
    entries = _load(module, gm, ops, name, **load)
    gm.add_submodule(name, module)
    registry[key] = name
    return name, entries


def stacked_holder(gm: fx.GraphModule, ops: Sequence[Any], roles: Sequence[str]) -> nn.Module:
    """An empty module with one parameter per role, shaped like the rows' stacked tensors."""
    holder = nn.Module()
    for role in roles:
        like = get_tensor(gm, ops[0].param(role))
        setattr(holder, role, nn.Parameter(torch.empty(len(ops), *like.shape, dtype=like.dtype,
                                                       device=like.device)))
    return holder
