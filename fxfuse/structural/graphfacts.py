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


def _schema_of(node: fx.Node):
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    packet = getattr(torch.ops.aten, name, None) if name and not name.startswith("_") else None
    overload = getattr(packet, "default", None) or getattr(packet, "Tensor", None) \
        or getattr(packet, "int", None)
    return getattr(overload, "_schema", None)


def is_view(node: fx.Node) -> bool:
    """``node``'s result shares memory with its first input (its schema says the result
    aliases it: ``select``, ``view``, ``transpose``; or indexing with ``x[...]``)."""
    if node.op not in ("call_function", "call_method") or not node.args \
            or not isinstance(node.args[0], fx.Node):
        return False
    if node.target is operator.getitem:     # x[...], or a piece of split / unbind / chunk
        return is_tensor_node(node.args[0]) or is_view(node.args[0])
    schema = _schema_of(node)
    if schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def alias_roots(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Per node, the node whose memory its result views (itself when it is no view)."""
    roots: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        roots[node] = roots.get(node.args[0], node.args[0]) if is_view(node) else node
    return roots


def dependencies(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Per node, the nodes it must come after: its inputs, and every earlier in-place
    write into the memory it reads (through any view of it)."""
    roots = alias_roots(gm)
    deps: dict[fx.Node, list[fx.Node]] = {}
    writes: dict[fx.Node, list[fx.Node]] = {}   # root -> writes into it so far
    for node in gm.graph.nodes:
        inputs = list(node.all_input_nodes)
        extra = [w for i in inputs for w in writes.get(roots[i], ()) if w is not node]
        deps[node] = inputs + extra
        base = mutated_input(node, gm)
        if base is not None:
            writes.setdefault(roots[base], []).append(node)
    return deps


def writers(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Per node, the in-place ops that write into its memory (or a view of it)."""
    roots = alias_roots(gm)
    found: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        base = mutated_input(node, gm)
        if base is not None:
            found.setdefault(roots[base], []).append(node)
    return found


def written_values(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Per written memory (alias root), the tensors written into it in place, in order:
    ``out[:, i] = v``, ``out[:, i].copy_(v)``, ATen ``copy_(select(out), v)``."""
    roots = alias_roots(gm)
    found: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        base = mutated_input(node, gm)
        if base is None:
            continue
        values = [a for a in node.all_input_nodes if a is not base]
        if len(values) == 1:
            found.setdefault(roots[base], []).append(values[0])
    return found


def is_tensor_node(node: fx.Node) -> bool:
    """The node's value (as traced) is a tensor."""
    if "tensor_meta" in node.meta and node.meta["tensor_meta"] is not None:
        meta = node.meta["tensor_meta"]
        return hasattr(meta, "shape")
    return isinstance(node.meta.get("val"), torch.Tensor)
