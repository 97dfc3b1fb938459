"""BatchNorm1d rows in conv towers: ``nn.BatchNorm1d`` and exported ``aten.batch_norm``
(eval). Fused as one ``BatchNorm1d(G*C)``: per-channel statistics stay each row's own,
in train mode too."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ...graphs.build import fused_module
from ..ops import BATCH_NORM, get_attr_args
from ..params import get_tensor
from .base import Lane, RowKind, RowOp, called_module, register

_BUFFERS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class BatchNormKey:
    """What must agree between rows' batch norms."""

    num_features: int
    eps: float
    momentum: Any
    affine: bool
    track_running_stats: bool
    training: bool
    dtype: torch.dtype | None


def _aten_batchnorm(node: fx.Node, root: nn.Module, name: str) -> RowOp | None:
    """``aten.batch_norm`` of an exported model in eval mode (running statistics)."""
    args = list(node.args) + [None] * (9 - len(node.args))
    inp, weight, bias, mean, var, training, momentum, eps = args[:8]
    tensors = {"weight": weight, "bias": bias, "running_mean": mean, "running_var": var}
    if training is not False or not isinstance(inp, fx.Node) or mean is None or var is None:
        return None
    if not get_attr_args(*tensors.values()):
        return None
    params = tuple((role, str(t.target)) for role, t in tensors.items() if t is not None)
    owner = params[-1][1].rpartition(".")[0]
    counter = f"{owner}.num_batches_tracked"
    try:
        get_tensor(root, counter)
        params += (("num_batches_tracked", counter),)
    except AttributeError:
        pass
    running = get_tensor(root, str(mean.target))
    affine = weight is not None and bias is not None
    key = BatchNormKey(int(running.shape[0]), float(eps), momentum, affine, True, False,
                       get_tensor(root, str(weight.target)).dtype if affine else None)
    return RowOp(node, name, key, params, None, inp, f"batchnorm {running.shape[0]}")


@register("batchnorm")
class BatchNormKind(RowKind):
    title = "BatchNorm1d"
    families = frozenset(("conv",))
    batch_statistics = True
    module_base = nn.BatchNorm1d

    def recognise(self, node: fx.Node, root: nn.Module) -> RowOp | None:
        if BATCH_NORM.calls_function(node):
            return _aten_batchnorm(node, root, self.name)
        mod = called_module(node, root, (nn.BatchNorm1d,))
        if mod is None:
            return None
        key = BatchNormKey(mod.num_features, mod.eps, mod.momentum, mod.affine,
                           mod.track_running_stats, mod.training,
                           mod.weight.dtype if mod.affine else None)
        params = tuple((r, f"{node.target}.{r}") for r in _BUFFERS
                       if getattr(mod, r, None) is not None)
        return RowOp(node, self.name, key, params, str(node.target), node.args[0],
                     f"batchnorm {mod.num_features}")

    def emit(self, lane: Lane, ops: list[RowOp]) -> None:
        k = ops[0].key
        device = get_tensor(lane.gm, ops[0].params[0][1]).device
        name, entries = fused_module(lane.gm, ops, "batchnorm", lane.prefix, lambda: nn.BatchNorm1d(
            k.num_features * len(ops), eps=k.eps, momentum=k.momentum, affine=k.affine,
            track_running_stats=k.track_running_stats, device=device,
            dtype=k.dtype).train(k.training))
        lane.node = lane.graph.call_module(name, (lane.flat(),))
        lane.entries += entries

    def rows_problem(self, root: nn.Module, ops: list[RowOp]) -> str:
        if ops[0].param("num_batches_tracked") is None:
            return ""
        counts = {int(get_tensor(root, op.param("num_batches_tracked"))) for op in ops}
        if len(counts) > 1:
            return "the rows' BatchNorm1d layers have seen different numbers of batches"
        return ""
