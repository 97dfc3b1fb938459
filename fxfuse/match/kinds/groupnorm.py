"""GroupNorm rows in conv towers: ``nn.GroupNorm``, ``F.group_norm`` with attribute
weights, ``aten.group_norm``. Per-sample statistics over groups of a row's channels, so
the rows' channels side by side are ``GroupNorm(G*groups, G*C)`` exactly."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from ...graphs.build import fused_module
from ..ops import GROUP_NORM, get_attr_args
from ..params import get_tensor
from .base import Lane, RowKind, RowOp, called_module, register, roles


@dataclass(frozen=True)
class GroupNormKey:
    """What must agree between rows' group norms."""

    num_groups: int
    num_channels: int
    eps: float
    affine: bool
    dtype: torch.dtype | None


def _functional(node: fx.Node, root: nn.Module) -> tuple | None:
    names = ("input", "num_groups", "weight", "bias", "eps")
    args = dict(zip(names, node.args))
    args.update({k: v for k, v in node.kwargs.items() if k in names})
    inp, weight, bias = args.get("input"), args.get("weight"), args.get("bias")
    if not isinstance(inp, fx.Node) or weight is None or bias is None or \
            not get_attr_args(weight, bias) or not isinstance(args.get("num_groups"), int):
        return None            # without weights the channel count is not known here
    w = get_tensor(root, str(weight.target))
    return (inp, args["num_groups"], int(w.shape[0]), float(args.get("eps", 1e-5)),
            str(weight.target), str(bias.target), w.dtype)


@register("groupnorm")
class GroupNormKind(RowKind):
    title = "GroupNorm"
    families = frozenset(("conv",))
    module_base = nn.GroupNorm

    def recognise(self, node: fx.Node, root: nn.Module) -> RowOp | None:
        mod = called_module(node, root, (nn.GroupNorm,))
        if mod is not None:
            w, b = (f"{node.target}.{r}" if mod.affine else None for r in ("weight", "bias"))
            found = (node.args[0], mod.num_groups, mod.num_channels, float(mod.eps), w, b,
                     mod.weight.dtype if mod.affine else None)
        else:
            found = _functional(node, root) if GROUP_NORM.calls_function(node) else None
        if found is None:
            return None
        inp, groups, channels, eps, w, b, dtype = found
        params = roles(weight=w, bias=b)
        return RowOp(node, self.name, GroupNormKey(groups, channels, eps, w is not None, dtype),
                     params, str(node.target) if node.op == "call_module" else None, inp,
                     f"groupnorm {groups}x{channels}")

    def emit(self, lane: Lane, ops: list[RowOp]) -> None:
        k, g = ops[0].key, len(ops)
        device = get_tensor(lane.gm, ops[0].params[0][1]).device if ops[0].params else None
        name, entries = fused_module(lane.gm, ops, "groupnorm", lane.prefix, lambda: nn.GroupNorm(
            g * k.num_groups, g * k.num_channels, eps=k.eps, affine=k.affine, device=device,
            dtype=k.dtype))
        lane.node = lane.graph.call_module(name, (lane.flat(),))
        lane.entries += entries
