"""Drop the layout copies the rewrite inserted where no consumer needs them.

A rewrite gives the loop's layout back as ``permute(...)`` then ``.contiguous()``. The
copy costs a kernel and a pass over memory, and most consumers do not need it:
convolutions and matmuls take any strides and return a fresh tensor; pointwise ops,
reductions and views take any strides too, though their result may carry the permuted
layout on. A copy stays where anything needs it: ``view``, an in-place op (the result
would alias the fused output), an op this module does not know, and the model's output
(whose strides must stay those of the original). A copy is dropped only when every
path from it reaches a consumer that takes any strides and returns a fresh layout.

Before::

    permute = unflatten.permute(0, 2, 1, 3);  contiguous = permute.contiguous()
    relu = torch.relu(contiguous);  conv2d = self.head(relu)

After::

    permute = unflatten.permute(0, 2, 1, 3)
    relu = torch.relu(permute);  conv2d = self.head(relu)
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .rewriter import INSERTED_KEY, REPLACES_KEY

# Take any strides and return a tensor whose layout does not depend on the input's.
_FRESH_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Bilinear)
_FRESH_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, torch.bmm,
                    torch.mm, operator.matmul, torch.einsum, getattr}
_FRESH_METHODS = {"matmul", "bmm", "mm", "size", "dim", "numel", "item", "tolist"}

# Take any strides; the result may keep the input's layout (so look at its users).
_PASSING_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6,
                    nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish,
                    nn.Hardswish, nn.Softplus, nn.Dropout, nn.Identity, nn.Softmax,
                    nn.LogSoftmax)
_PASSING_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    operator.getitem, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.relu,
    torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.clamp, torch.sum, torch.mean,
    torch.amax, torch.amin, torch.flatten, torch.reshape, torch.transpose, torch.permute,
    torch.squeeze, torch.unsqueeze, torch.select, torch.narrow, torch.cat, torch.stack,
    torch.softmax, F.relu, F.gelu, F.silu, F.sigmoid, F.tanh, F.leaky_relu, F.elu,
    F.dropout, F.softmax, F.log_softmax, F.batch_norm}
_PASSING_METHODS = {"relu", "sigmoid", "tanh", "exp", "abs", "clamp", "add", "sub", "mul",
                    "div", "neg", "sum", "mean", "amax", "amin", "reshape", "flatten",
                    "permute", "transpose", "unsqueeze", "squeeze", "select", "narrow",
                    "softmax", "log_softmax", "float", "half", "double", "to", "type_as",
                    "unflatten", "movedim", "gelu"}


def _is_copy(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "contiguous" and not node.kwargs \
        and len(node.args) == 1 and INSERTED_KEY in node.meta


def _role(node: fx.Node, gm: fx.GraphModule) -> str:
    """``"fresh"``, ``"passing"`` or ``"needs"`` (a contiguous input, or unknown)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if getattr(module, "inplace", False):
            return "needs"
        if isinstance(module, _FRESH_MODULES):
            return "fresh"
        return "passing" if isinstance(module, _PASSING_MODULES) else "needs"
    if node.kwargs.get("inplace") or node.kwargs.get("out") is not None:
        return "needs"
    if node.op == "call_function":
        if node.target in _FRESH_FUNCTIONS:
            return "fresh"
        return "passing" if node.target in _PASSING_FUNCTIONS else "needs"
    if node.op == "call_method":
        if node.target in _FRESH_METHODS:
            return "fresh"
        return "passing" if node.target in _PASSING_METHODS else "needs"
    return "needs"    # the output, or anything else


def copy_needed(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when some path from ``node``'s users reaches a consumer that needs the copy."""
    seen: set[fx.Node] = set()
    todo = list(node.users)
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        role = _role(user, gm)
        if role == "needs":
            return True
        if role == "passing":
            todo.extend(user.users)
    return False


def drop_needless_copies(gm: fx.GraphModule) -> int:
    """Remove the inserted ``.contiguous()`` copies no consumer needs (see module doc).

    Args:
        gm: a rewritten GraphModule (call ``recompile`` afterwards).

    Returns:
        The number of copies removed.
    """
    removed = 0
    for node in list(gm.graph.nodes):
        if not _is_copy(node) or not node.users or copy_needed(node, gm):
            continue
        base = node.args[0]
        if REPLACES_KEY in node.meta and isinstance(base, fx.Node):
            base.meta.setdefault(REPLACES_KEY, node.meta[REPLACES_KEY])
        node.replace_all_uses_with(base)
        gm.graph.erase_node(node)
        removed += 1
    return removed


def _has_inserted_ancestor(node: fx.Node) -> bool:
    seen, todo = set(), [node]
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if INSERTED_KEY in cur.meta:
            return True
        todo.extend(cur.all_input_nodes)
    return False


def restore_output_layout(gm: fx.GraphModule) -> int:
    """Give every model output the memory format the original output had.

    A fused result can reach the output in another layout than the loop's (a
    channels-last ``Conv2d`` for ``grouped2d``, or a dropped copy upstream of an op whose
    result keeps its input's strides). Each output tensor computed from inserted nodes
    whose traced original was dense in a memory format gets ``.contiguous(that format)``,
    which costs nothing when the tensor already is.

    Returns:
        The number of copies inserted (call ``recompile`` afterwards).
    """
    graph, added = gm.graph, 0
    output = next(iter(reversed(graph.nodes)))
    if output.op != "output":
        return 0

    def fix(node: fx.Node) -> fx.Node:
        nonlocal added
        meta = node.meta.get("tensor_meta")
        fmt = getattr(meta, "memory_format", None)
        if fmt is None or _is_copy(node) or not _has_inserted_ancestor(node):
            return node
        with graph.inserting_before(output):
            copy = graph.call_method("contiguous", (node,),
                                     {} if fmt == torch.contiguous_format
                                     else {"memory_format": fmt})
        copy.meta.update({k: v for k, v in node.meta.items() if k != INSERTED_KEY})
        copy.meta[INSERTED_KEY] = node.meta.get(INSERTED_KEY, "output")
        added += 1
        return copy

    output.args = fx.node.map_arg(output.args, fix)
    return added
