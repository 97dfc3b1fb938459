"""The ``torch.export`` route: a dynamic batch shaped like the signature, and dropout
that follows ``train()``/``eval()``."""
from __future__ import annotations

import inspect
import operator
import types
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..compat import BatchDims, export_training_ir, say_absent
from ..errors import TraceError

MODE_KEY = "fxfuse_traced_training"   # gm.meta: the mode a batch-norm export graph fixes
PRESERVED_KEY = "_user_preserved_attributes"  # gm.meta: attributes GraphModule copies keep


def export_model(model: torch.nn.Module, example_inputs: tuple[Any, ...]) -> fx.GraphModule:
    """``torch.export`` (non-strict) with a dynamic batch when export keeps one, static
    shapes otherwise; returns the unlifted module, dropout as ``nn.Dropout`` modules."""
    dims = batch_dynamic_shapes(model, example_inputs)
    try:
        program = export_training_ir(model, _batch_of_two(example_inputs), dynamic_shapes=dims,
                                     strict=False)
    except Exception:  # noqa: BLE001 - a dynamic batch is a bonus; fall back to static shapes
        program = export_training_ir(model, example_inputs, strict=False)
    gm = program.module()
    dropout_as_modules(gm)
    follow_mode(gm, model.training)
    return gm


def _batch_of_two(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Batch-1 inputs repeated to batch 2: export specialises a size-1 dim to 1, and the
    traced graph would then refuse every other batch size."""
    leaves = pytree.tree_leaves(example_inputs)
    batched = [x for x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not batched or any(x.shape[0] != 1 for x in batched):
        return example_inputs
    return pytree.tree_map(
        lambda x: x.expand(2, *x.shape[1:]).clone()
        if isinstance(x, torch.Tensor) and x.dim() > 0 else x, example_inputs)


def batch_dynamic_shapes(model: torch.nn.Module, example_inputs: tuple[Any, ...]) -> Any:
    """``torch.export`` dynamic shapes with a dynamic dim 0 for every batched tensor,
    shaped like the signature (``*args`` get a tuple, nested tuples nest): a flat spec
    is refused for varargs and export then falls back to one batch size."""
    batch = BatchDims()

    def spec(value: Any) -> Any:
        return pytree.tree_map(lambda x: {0: batch(x)}
                               if isinstance(x, torch.Tensor) and x.dim() > 0 else None, value)
    try:
        bound = inspect.signature(model.forward).bind(*example_inputs)
    except (TypeError, ValueError):
        bound = None
    if bound is None:
        return tuple(spec(x) for x in example_inputs)
    return {name: spec(value) for name, value in bound.arguments.items()}


def keep_input_checks(gm: fx.GraphModule) -> int:
    """Put the static input dims of an exported module into its graph, where torch 2.6 and
    older leave them out.

    ``ExportedProgram.module()`` checks its inputs in a forward pre-hook, which no copy
    or re-trace keeps; newer torch (2.13) also calls the check in the graph (``_guards_fn``),
    so a fused module refuses the shapes the program refuses. Where that call is missing,
    each input's static dims are asserted in the graph (``torch._assert``), to the same
    effect. Returns how many inputs got an assertion."""
    checked = any(getattr(h, "__name__", "") == "_check_input_constraints_pre_hook"
                  for h in gm._forward_pre_hooks.values())
    if not checked or any(n.op == "call_module" and n.target == "_guards_fn"
                          for n in gm.graph.nodes):
        return 0
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    count = 0
    for node in reversed(inputs):
        val = node.meta.get("val")
        dims = [(d, int(s)) for d, s in enumerate(getattr(val, "shape", ()))
                if isinstance(s, int)]
        if not isinstance(val, torch.Tensor) or not dims:
            continue
        with gm.graph.inserting_after(inputs[-1]):
            for d, size in reversed(dims):
                n_size = gm.graph.call_method("size", (node, d))
                with gm.graph.inserting_after(n_size):
                    n_eq = gm.graph.call_function(operator.eq, (n_size, size))
                with gm.graph.inserting_after(n_eq):
                    gm.graph.call_function(torch._assert, (n_eq, (
                        f"input {node.name!r} must have size {size} in dim {d}, as exported")))
        count += 1
    if count:
        say_absent("input checks inside an exported module's graph",
                   "the static input dims are asserted in the graph")
        gm.graph.lint()
        gm.recompile()
    return count


def dropout_as_modules(gm: fx.GraphModule) -> int:
    """Turn an exported graph's ``aten.dropout(x, p, train)`` into calls of ``nn.Dropout``
    submodules, so ``train()``/``eval()`` reach them (the exported graph fixes the flag
    it was traced with). Returns how many were turned."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.dropout.default:
            continue
        x, p, train = (list(node.args) + [node.kwargs.get("p", 0.5),
                                          node.kwargs.get("train", True)])[:3]
        name = f"fxfuse_dropout_{count}"
        module = torch.nn.Dropout(float(p))
        module.train(bool(train))
        gm.add_module(name, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


class FixedModeError(TraceError, NotImplementedError):
    """The exported graph computes one train/eval mode only (batch norm fixed by export)."""


def _fixed_mode_train(self: fx.GraphModule, mode: bool = True) -> fx.GraphModule:
    traced = self.meta.get(MODE_KEY)
    if traced is None or bool(mode) == traced:
        return torch.nn.Module.train(self, mode)
    given, asked = ("train", "eval") if traced else ("eval", "train")
    raise FixedModeError(f"this graph runs batch norm or dropout in {given} mode only and "
                         f"cannot switch to {asked} mode; fuse the model in {asked} mode")


def _fixed_mode_eval(self: fx.GraphModule) -> fx.GraphModule:
    return self.train(False)


def _install_fixed_mode(gm: fx.GraphModule) -> None:
    """Bind the fixed-mode ``train``/``eval`` to ``gm`` (also to each deep copy: a copy
    of a GraphModule keeps ``meta`` and its deepcopy hooks, not instance methods)."""
    gm.train = types.MethodType(_fixed_mode_train, gm)
    gm.eval = types.MethodType(_fixed_mode_eval, gm)


def follow_mode(gm: fx.GraphModule, training: bool) -> None:
    """Make ``gm.train()``/``gm.eval()`` work like any module's. ``torch.export``'s module
    refuses both; once dropout follows the mode (:func:`dropout_as_modules`) and nothing
    else depends on it, the stock methods are right. With batch norm (its mode fixed by
    the trace) the traced mode is accepted and the other refused with one clear line."""
    for attr in ("train", "eval"):
        gm.__dict__.pop(attr, None)
    gm.train(training)
    if _has_mode_dependent_ops(gm):
        fix_mode(gm, training)


def fix_mode(gm: fx.GraphModule, training: bool) -> None:
    """``gm`` runs in one mode only: ``train(training)`` works, the other mode is refused
    with :class:`FixedModeError` (deep copies too)."""
    gm.meta[MODE_KEY] = bool(training)
    _install_fixed_mode(gm)
    register = getattr(gm, "_register_deepcopy_hook", None)
    if register is not None:
        register(_install_fixed_mode)
        return
    # No deepcopy hooks (torch 2.6 and older): a deep copy sets again the attributes listed
    # in this meta entry, and copying a bound method binds it to the copy.
    say_absent("GraphModule._register_deepcopy_hook",
               "a fixed train/eval mode reaches deep copies through the GraphModule's meta")
    gm.meta.setdefault(PRESERVED_KEY, {}).update(train=gm.train, eval=gm.eval)


def _has_mode_dependent_ops(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and "batch_norm" in str(n.target) for n in gm.graph.nodes)
