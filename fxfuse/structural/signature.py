"""When two rows are the same code: a structural signature per row.

Two rows are isomorphic when their nodes, in graph order, call the same targets wired
alike, with equal non-tensor arguments, module calls of the same class and
configuration, and parameters of equal shape, dtype and device. A row's *readers*
(ops that only index tensors from outside the row, ``x[:, :, i]``) may differ in their
constants: they are how each row picks its slice, and are run as they are.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

MASK = "?"
_SIMPLE = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format,
           torch.layout)


def constant_key(value: Any) -> Any:
    """A hashable, comparable form of a non-node argument."""
    if isinstance(value, slice):
        return ("slice", constant_key(value.start), constant_key(value.stop),
                constant_key(value.step))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(constant_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, constant_key(v)) for k, v in value.items())))
    if isinstance(value, _SIMPLE) or value is Ellipsis:
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, str(value.device), id(value))
    return ("object", type(value).__qualname__, id(value))


def tensor_key(t: torch.Tensor, sized: bool = True) -> tuple:
    """Shape (its rank alone unless ``sized``), dtype, device and whether it is a
    trainable parameter."""
    return (tuple(t.shape) if sized else t.dim(), t.dtype, str(t.device), t.requires_grad,
            isinstance(t, torch.nn.Parameter))


def is_size(value: Any) -> bool:
    """An int, or a tuple or list of ints: what a size in a module's configuration is."""
    if isinstance(value, (tuple, list)):
        return bool(value) and all(is_size(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def module_key(module: torch.nn.Module, sized: bool = True) -> tuple:
    """Class and configuration of a module: its plain attributes, the shapes of its
    parameters and buffers, its submodules' keys, and whether it carries hooks. Unless
    ``sized``, sizes are left out (shapes reduced to ranks, sizes in the configuration
    masked): rows that differ only in sizes then share a key."""
    config = tuple(sorted((k, MASK if not sized and is_size(v) else constant_key(v))
                          for k, v in vars(module).items()
                          if not k.startswith("_") and isinstance(v, (*_SIMPLE, tuple, list))))
    tensors = tuple((name, tensor_key(t, sized)) for name, t in
                    [*module._parameters.items(), *module._buffers.items()] if t is not None)
    nones = tuple(name for name, t in [*module._parameters.items(), *module._buffers.items()]
                  if t is None)
    children = tuple((name, module_key(child, sized)) for name, child in module.named_children())
    hooks = bool(module._forward_hooks or module._forward_pre_hooks
                 or getattr(module, "parametrizations", None))
    return (type(module), config, tensors, nones, children, hooks)


def target_key(node: fx.Node, gm: fx.GraphModule, sized: bool = True) -> Any:
    """What a node runs, with its parameters reduced to their shapes (ranks unless
    ``sized``)."""
    if node.op == "call_module":
        return ("module", module_key(gm.get_submodule(str(node.target)), sized))
    if node.op == "get_attr":
        value = _attr(gm, str(node.target))
        return ("attr", tensor_key(value, sized) if isinstance(value, torch.Tensor)
                else constant_key(value))
    return (node.op, node.target)


def _attr(gm: fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def readers(body: tuple[fx.Node, ...]) -> set[fx.Node]:
    """The row's ops computed from outside values alone (no parameter of the row on
    the way): index ops such as ``x[:, i]`` or ``x[:, :][:, i]``, and the numbers they
    index with."""
    inside, found = set(body), set()
    for node in body:
        if node.op in ("call_function", "call_method") and node.all_input_nodes and \
                all(n not in inside or n in found for n in node.all_input_nodes):
            found.add(node)
    return found


def row_signature(body: tuple[fx.Node, ...], gm: fx.GraphModule, sized: bool = True) -> tuple:
    """The structure of one row, readers' constants masked; externals numbered by
    first use, own nodes by position (its parameters' sizes left out unless ``sized``)."""
    pre = readers(body)
    local = {n: i for i, n in enumerate(body)}
    ext: dict[fx.Node, int] = {}

    def arg(value: Any, masked: bool) -> Any:
        if isinstance(value, fx.Node):
            if value in local:
                return ("L", local[value])
            return ("E", ext.setdefault(value, len(ext)))
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(arg(v, masked) for v in value))
        if isinstance(value, dict):
            return ("dict", tuple(sorted((k, arg(v, masked)) for k, v in value.items())))
        if isinstance(value, slice):
            return ("slice", arg(value.start, masked), arg(value.stop, masked),
                    arg(value.step, masked))
        return MASK if masked else constant_key(value)

    sig = []
    for node in body:
        masked = node in pre
        sig.append((node.op, target_key(node, gm, sized), arg(tuple(node.args), masked),
                    arg(dict(node.kwargs), masked), len(node.users) > 0))
    return tuple(sig)


def reader_constants(node: fx.Node) -> Any:
    """The constants of a reader (what picks its row), for comparing rows."""
    def strip(value: Any) -> Any:
        if isinstance(value, fx.Node):
            return "node"
        if isinstance(value, (list, tuple)):
            return tuple(strip(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, strip(v)) for k, v in value.items()))
        if isinstance(value, slice):
            return ("slice", strip(value.start), strip(value.stop), strip(value.step))
        return constant_key(value)
    return strip((node.args, node.kwargs))
