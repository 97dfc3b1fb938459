"""The third tracing route: shapes fixed by the example inputs, values never read.

For models neither ``torch.fx.symbolic_trace`` (Python reading ``len(x.shape)``) nor
``torch.export`` (a submodule named like an ``nn.Module`` method, say ``parameters``)
takes. ``make_fx`` runs ``forward`` on fake tensors of the example shapes, with every
parameter and buffer passed in as an input; those inputs then become ``get_attr`` nodes
at the parameter's module path, so the matcher sees the weights it knows. A branch on
tensor *values* still fails here (fake tensors have none), so nothing data-dependent is
baked in; shapes are, and the result accepts the traced shapes only.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from ..weightmap import WeightEntry, WeightMap



def trace_real(model: nn.Module, example_inputs: tuple[Any, ...]
               ) -> tuple[fx.GraphModule, tuple[str, ...], WeightMap]:
    """Trace ``model`` on fake tensors shaped like ``example_inputs``.

    Returns:
        A GraphModule whose parameters and buffers sit at their module paths (a path
        component named like an ``nn.Module`` attribute gets a trailing ``_``), with the
        shapes of the example inputs fixed; the notes for the user; the map of renamed
        state back to the model's paths.
    """
    names, tensors = _unique_state(model)

    def run(state: list[torch.Tensor], *args: Any) -> Any:
        with _swapped(model, dict(zip(names, state))):
            return model(*args)

    traced = make_fx(run, tracing_mode="fake", pre_dispatch=True)(list(tensors), *example_inputs)
    return _with_state_as_attributes(traced, names, tensors)


def _unique_state(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of every parameter and buffer, tied ones once (first name)."""
    names, tensors, seen = [], [], set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            names.append(name)
            tensors.append(tensor)
    return names, tensors


@contextlib.contextmanager
def _swapped(model: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Every parameter/buffer (tied ones included) replaced by the traced stand-in; walks
    ``_modules`` so a child named like a method (``parameters``) is reached."""
    by_id = {id(t): state[n] for n, t in zip(*_unique_state(model))}
    saved = []
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, value in store.items():
                if value is not None and id(value) in by_id:
                    saved.append((store, key, value))
                    store[key] = by_id[id(value)]
    try:
        yield
    finally:
        for store, key, value in saved:
            store[key] = value


def _safe_path(name: str) -> str:
    """``name`` with every module component that an ``nn.Module`` attribute shadows
    (``parameters``, ``train``, ...) given a trailing ``_``."""
    *prefix, field = name.split(".")
    return ".".join([p + "_" if hasattr(nn.Module, p) else p for p in prefix] + [field])


def _with_state_as_attributes(traced: fx.GraphModule, names: list[str],
                              tensors: list[torch.Tensor]
                              ) -> tuple[fx.GraphModule, tuple[str, ...], WeightMap]:
    root = nn.Module()
    graph = traced.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    renamed, entries = [], []
    for node, name, tensor in zip(placeholders, names, tensors):
        path = _safe_path(name)
        if path != name:
            renamed.append(f"{name} -> {path}")
            entries.append(WeightEntry(path, (name,)))
        _install(root, path, tensor)
        with graph.inserting_before(node), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the path exists on the module built below
            attr = graph.get_attr(path)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    _drop_state_from_signature(graph)
    gm = fx.GraphModule(root, graph)
    gm.recompile()
    notes = ["traced with make_fx on fake tensors (neither symbolic_trace nor torch.export "
             "took the model): shapes read in Python are fixed to the example inputs'"]
    if renamed:
        notes.append("state renamed where a module path shadows an nn.Module attribute: "
                     + ", ".join(renamed))
    return gm, tuple(notes), WeightMap(tuple(entries))


def _install(root: nn.Module, path: str, tensor: torch.Tensor) -> None:
    *prefix, field = path.split(".")
    module = root
    for item in prefix:
        child = module._modules.get(item)
        if child is None:
            child = nn.Module()
            module.add_module(item, child)
        module = child
    if isinstance(tensor, nn.Parameter):
        module.register_parameter(field, tensor)
    else:
        module.register_buffer(field, tensor)


def _drop_state_from_signature(graph: fx.Graph) -> None:
    """The traced function took ``(state, *args)``; the module takes ``*args``."""
    codegen = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None:
        return
    dummy = pytree.tree_unflatten([0] * info.in_spec.num_leaves, info.in_spec)
    new_in = pytree.tree_structure(tuple(dummy[1:]))     # (state_list, *args) -> args
    graph._codegen = type(codegen)(type(info)(list(info.orig_args[1:]), new_in, info.out_spec))
