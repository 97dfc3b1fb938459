"""Rows summed (or averaged) over: ``torch.stack(outs, 0).sum(0)``, ``sum(outs)``.

Σ_h conv_h(x_h) is one dense convolution over all rows' channels, weights concatenated
on the input-channel dim; Σ_h linear_h(x_h) is one Linear over the concatenated
features. The biases stay stacked (so checkpoints map back exactly) and are summed.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from .candidates import Candidate, walk_back
from .chains import RowChain
from .sites import OutputPlan

_SUM_FUNCTIONS = {torch.sum: "sum", torch.mean: "mean"}
_SUM_METHODS = {"sum": "sum", "mean": "mean"}
_SUM_ATEN = {torch.ops.aten.sum: "sum", torch.ops.aten.mean: "mean"}


def _is_add(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target in (operator.add, torch.add)
        or getattr(node.target, "overloadpacket", None) is torch.ops.aten.add)


def sum_candidate(node: fx.Node, row_ops: set[fx.Node]) -> Candidate | None:
    """The last ``add`` of a chain ``((0 + r0) + r1) + ...`` over per-row results, or None."""
    if not _is_add(node) or any(_is_add(u) for u in node.users) or node.kwargs:
        return None
    terms, adds, cur = [], [], node
    while isinstance(cur, fx.Node) and _is_add(cur) and len(cur.args) == 2 and not cur.kwargs:
        adds.append(cur)
        left, right = cur.args
        terms.append(right)
        if isinstance(left, (int, float)) and left == 0:
            break
        if not isinstance(left, fx.Node) or (cur is not node and len(cur.users) != 1):
            return None
        if not _is_add(left) or len(left.users) != 1:
            terms.append(left)
            break
        cur = left
    terms.reverse()
    cand = Candidate(node, "sum")
    for term in terms:
        if not isinstance(term, fx.Node):
            return None
        path, base = walk_back(term, row_ops)
        if base not in row_ops or path:
            return None
        cand.convs.append(base)
    if len(cand.convs) < 2:
        return None
    cand.output_nodes.update(a for a in adds if a is not node)
    return cand


def reduce_kind(node: fx.Node) -> tuple[str, object] | None:
    """(``"sum"``/``"mean"``, dim) when ``node`` reduces one dim without keepdim."""
    if node.op == "call_function":
        kind = _SUM_FUNCTIONS.get(node.target) or \
            _SUM_ATEN.get(getattr(node.target, "overloadpacket", None))
    elif node.op == "call_method":
        kind = _SUM_METHODS.get(str(node.target))
    else:
        kind = None
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
    if ops[-1].kind not in ("conv", "linear") or \
            any(op.kind not in ("pointwise", "pad") for op in ops[:-1]):
        return False
    return ops[-1].kind == "linear" or ops[-1].key.groups == 1


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
