"""1-D pooling rows (``MaxPool1d``, ``AvgPool1d``, the adaptive pools, their functions):
a pool acts on each channel along the length, so on the grouped (N, G*C, L) layout one
call pools every row's channels exactly as the rows did. Conv layout only (on the
batched-matmul layout the rows are one more dim than a 1-D pool takes)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ops import OpTable, aten, const_key, hooks_of, op_name, tensor_args_only_first
from .base import RowKind, RowOp, called_module, register

POOL = OpTable(
    functions=(F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d,
               F.lp_pool1d, torch.max_pool1d, torch.avg_pool1d, torch.adaptive_avg_pool1d),
    aten=(aten.max_pool1d, aten.avg_pool1d, aten.adaptive_avg_pool1d))
POOL_MODULES = (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d,
                nn.LPPool1d)


@dataclass(frozen=True)
class PoolKey:
    """The pool and its settings (for a module: its type and ``extra_repr``)."""

    spelling: str
    target: Any
    settings: str


def _returns_indices(node: fx.Node, mod: nn.Module | None) -> bool:
    if mod is not None:
        return bool(getattr(mod, "return_indices", False))
    flag = node.kwargs.get("return_indices", False)
    if node.target in (F.max_pool1d,) and len(node.args) > 6:
        flag = node.args[6]
    elif node.target in (F.adaptive_max_pool1d,) and len(node.args) > 2:
        flag = node.args[2]
    return flag is not False


@register("pool")
class PoolKind(RowKind):
    title = "pool"
    families = frozenset(("conv",))

    def recognise(self, node: fx.Node, root: nn.Module) -> RowOp | None:
        mod = None
        if node.op == "call_module":
            mod = called_module(node, root, POOL_MODULES)
            if mod is None or hooks_of(mod):
                return None
            key = PoolKey("module", type(mod), mod.extra_repr())
            name = type(mod).__name__.lower()
        elif POOL.calls_function(node) and tensor_args_only_first(node):
            key = PoolKey(*const_key(node)[:2], repr(const_key(node)[2:]))
            name = op_name(node)
        else:
            return None
        if _returns_indices(node, mod):
            return None          # a tuple, not a tensor per row
        return RowOp(node, self.name, key, (), None, node.args[0], name)
