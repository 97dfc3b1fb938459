"""Facts about an fx graph that structural matching needs: effective dependencies
(data edges plus the order that in-place writes impose) and which nodes mutate what.

In-place ops are read the way functionalisation reads them: ``y.relu_()`` is ``relu``
whose result replaces ``y``, so every later reader of ``y`` depends on the write. That
keeps ``ReLU(inplace=True)`` inside its row and makes ``out[:, i] = f(out[:, i - 1])``
visibly loop-carried.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx


def mutated_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The node whose tensor ``node`` writes into, or ``None`` for a pure node.

    The PyTorch conventions for writing in place: ``operator.setitem``, a method or
    function whose name ends in one underscore (``relu_``, ``add_``, ``copy_``), an
    ``inplace=True`` keyword, a module configured with ``inplace=True``, and ATen
    overloads whose schema marks the first argument as written.
    """
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    if node.op == "call_function" and node.target is operator.setitem:
        return first
    if node.kwargs.get("inplace") is True:
        return first
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return first if getattr(module, "inplace", False) is True else None
    if node.op in ("call_method", "call_function"):
        return first if _writes_first(node.target) else None
    return None


def _writes_first(target: Any) -> bool:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        args = schema.arguments
        return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.endswith("_") and not name.endswith("__") and not name.startswith("_")


def dependencies(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Per node, the nodes it must come after: its inputs, and every earlier in-place
    write into a tensor it reads."""
    deps: dict[fx.Node, list[fx.Node]] = {}
    writes: dict[fx.Node, list[fx.Node]] = {}   # base -> writes into it so far
    for node in gm.graph.nodes:
        inputs = list(node.all_input_nodes)
        extra = [w for base in inputs for w in writes.get(base, ()) if w is not node]
        deps[node] = inputs + extra
        base = mutated_input(node, gm)
        if base is not None:
            writes.setdefault(base, []).append(node)
    return deps


def writers(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Per node, the in-place ops that write into its tensor."""
    found: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        base = mutated_input(node, gm)
        if base is not None:
            found.setdefault(base, []).append(node)
    return found


def is_tensor_node(node: fx.Node) -> bool:
    """The node's value (as traced) is a tensor."""
    if "tensor_meta" in node.meta and node.meta["tensor_meta"] is not None:
        meta = node.meta["tensor_meta"]
        return hasattr(meta, "shape")
    return isinstance(node.meta.get("val"), torch.Tensor)
