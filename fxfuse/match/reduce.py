"""Rows summed (or averaged) over: ``torch.stack(outs, 0).sum(0)``, ``sum(outs)``.

Σ_h conv_h(x_h) is one dense convolution over all rows' channels, weights concatenated
on the input-channel dim; Σ_h linear_h(x_h) is one Linear over the concatenated
features. The biases stay stacked (so checkpoints map back exactly) and are summed.
"""
from __future__ import annotations

from torch import fx

from .chains import RowChain
from .ops import MEAN, SUM
from .sites import OutputPlan


def reduce_kind(node: fx.Node) -> tuple[str, object] | None:
    """(``"sum"``/``"mean"``, dim) when ``node`` reduces one dim without keepdim."""
    kind = "sum" if SUM.matches(node) else "mean" if MEAN.matches(node) else None
    if kind is None:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if not isinstance(dim, int) or keepdim or node.kwargs.get("dtype") is not None:
        return None
    return kind, dim


def can_reduce(chains: list[RowChain], shared: bool) -> bool:
    """Rows a dense op can sum: one conv (groups=1) or one Linear, pointwise ops only
    before it, and separate weights per row."""
    if shared:
        return False
    ops = chains[0].ops
    return ops[-1].row_kind.can_sum(ops[-1]) and all(op.row_kind.per_element for op in ops[:-1])


def reduced_plan(plan: OutputPlan, result_ndim: int, dim: int) -> OutputPlan | None:
    """The layout after reducing result dim ``dim``, if it holds exactly the row axis."""
    dim = dim % result_ndim
    runs = [plan.perm[start:stop] for start, stop in plan.spans()]
    if runs[dim] != (1,):
        return None
    rest = [d - 1 if d > 1 else d for d in plan.perm if d != 1]
    merge = tuple(len(r) for i, r in enumerate(runs) if i != dim)
    return OutputPlan(tuple(rest), merge)


def identity_plan(ndim: int) -> OutputPlan:
    """The layout of a plain (N, C', L') sum of rows."""
    return OutputPlan(tuple(range(ndim)), (1,) * ndim)
