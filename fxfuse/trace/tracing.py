"""Turn a model into a GraphModule whose nodes carry shapes.

``torch.fx.symbolic_trace`` first; when it cannot (a loop bound read from the input's
shape, a write into a preallocated tensor), ``torch.export`` (non-strict, see
``export.py``) gives an ATen-level graph; when neither can, ``make_fx`` on fake tensors
(``realtensor.py``). The matcher does not care which one it got. Example inputs that
share memory are traced on copies; optional arguments they leave out are bound.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import threading
from typing import Any, Iterator, Sequence

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from ..running import PIPELINE, torch_warnings_muted
from ..errors import TraceError, one_line
from ..weightmap import WeightMap
from .export import MODE_KEY, export_model
from .prepare import check_no_script_modules
from .traced import TRACER_KEY, Traced

log = logging.getLogger("fxfuse")

VALUE_KEY = "fxfuse_value"   # node.meta key: concrete non-tensor value seen at trace time


class _RecordingShapeProp(ShapeProp):
    """ShapeProp that also keeps the small non-tensor values (sizes, ints, slices)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if not isinstance(result, torch.Tensor) and _is_small_value(result):
            n.meta[VALUE_KEY] = result
        return result


def _is_small_value(value: Any) -> bool:
    if isinstance(value, (int, float, bool, str, slice, type(None), torch.Size, torch.dtype,
                          torch.device)):
        return True
    if isinstance(value, (list, tuple)):
        return len(value) <= 64 and all(_is_small_value(v) for v in value)
    return False


def _explain(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "control flow" in text or "cannot be interpreted as an integer" in text \
            or "iterate" in text or "Proxy" in text:
        return (f"{text} (Python control flow or a loop bound that depends on an input); "
                "pass concrete_args={...} for the arguments that fix it, or make the bound a "
                "constant attribute of the module, or make the branch not depend on values")
    return text


class _OwnThreadTracer(fx.Tracer):
    """``torch.fx.Tracer`` patches ``nn.Module.__call__`` and ``__getattr__`` for the whole
    process while it traces; this one lets every other thread's module calls and
    attribute reads through unchanged (they would otherwise be recorded into our graph,
    or fail with ``NameError: module is not installed as a submodule``)."""

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._owner = threading.get_ident()
        return super().trace(root, concrete_args)

    def call_module(self, m: torch.nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if threading.get_ident() != getattr(self, "_owner", None):
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if threading.get_ident() != getattr(self, "_owner", None):
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _symbolic(model: torch.nn.Module, concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    """``torch.fx.symbolic_trace``, with a tracer that leaves other threads alone."""
    tracer = _OwnThreadTracer()
    graph = tracer.trace(model, concrete_args)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _bound(model: torch.nn.Module, inputs: tuple[Any, ...]) -> inspect.BoundArguments | None:
    try:
        return inspect.signature(model.forward).bind(*inputs)
    except (TypeError, ValueError):
        return None


def unsupplied_defaults(model: torch.nn.Module, inputs: tuple[Any, ...]) -> dict[str, Any]:
    """The optional arguments of ``forward`` the example inputs leave out, with their
    defaults: bound as constants when tracing, not traced as inputs."""
    bound = _bound(model, inputs)
    if bound is None:
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name: p.default for name, p in bound.signature.parameters.items()
            if name not in bound.arguments and p.kind in kinds
            and p.default is not inspect.Parameter.empty and _is_small_value(p.default)}


def _check_arity(model: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*inputs)
    except TypeError as exc:
        raise TraceError(f"{type(model).__name__}.forward{signature} cannot take "
                         f"{len(inputs)} example input(s): {exc}; give one input per "
                         "positional argument") from exc


def trace_model(model: torch.nn.Module, example_inputs: Sequence[Any], *,
                concrete_args: dict[str, Any] | None = None,
                tracer: str = "auto") -> fx.GraphModule:
    """The GraphModule of :func:`trace` (its notes and renames left out)."""
    return trace(model, example_inputs, concrete_args=concrete_args, tracer=tracer).gm


def trace(model: torch.nn.Module, example_inputs: Sequence[Any], *,
          concrete_args: dict[str, Any] | None = None, tracer: str = "auto") -> Traced:
    """Trace ``model`` and annotate every node with its shape.

    Args:
        model: the module to trace. It is not modified; the returned GraphModule shares
            its submodules (deep-copy first if you will mutate them).
        example_inputs: positional inputs for one forward call; they fix the shapes the
            matcher reasons about. Optional arguments they leave out are bound to their
            defaults; inputs that share memory are traced on distinct copies.
        concrete_args: passed to ``torch.fx.symbolic_trace`` to specialise arguments.
        tracer: ``"auto"`` (symbolic, then export, then a real-tensor trace),
            ``"symbolic"`` or ``"export"``.

    Returns:
        A :class:`Traced`: the GraphModule, whose nodes carry ``meta["tensor_meta"]``
        (and, for small non-tensor values, ``meta["fxfuse_value"]``), the tracer used
        (also in ``gm.meta["fxfuse_tracer"]``), the notes a user should know, the
        renamed state and the mode the graph fixes.

    Raises:
        TraceError: no tracer could handle the model; the message names the construct
            and the way out.
    """
    if tracer not in ("auto", "symbolic", "export"):
        raise TraceError(f"unknown tracer {tracer!r}; use 'auto', 'symbolic' or 'export'")
    example_inputs = tuple(example_inputs)
    _check_arity(model, example_inputs)
    check_no_script_modules(model)
    notes: list[str] = []
    example_inputs, aliased = distinct_inputs(example_inputs)
    if aliased:
        notes.append(alias_note(aliased))
    defaults = unsupplied_defaults(model, example_inputs)
    if defaults:
        notes.append("optional arguments bound to their defaults: "
                     + ", ".join(f"{k}={v!r}" for k, v in defaults.items()))
    concrete = {**defaults, **(concrete_args or {})} or None
    with PIPELINE, torch_warnings_muted():   # tracing patches torch process-wide
        gm, used, more, renames = _trace_any(model, example_inputs, concrete, tracer)
    if used == "export":
        notes.append("traced with torch.export (ATen graph)")
    try:
        # ShapeProp prints its own traceback before raising; the error below says it all.
        with _buffers_kept(gm), contextlib.redirect_stderr(io.StringIO()):
            _RecordingShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:  # noqa: BLE001
        raise TraceError(f"the traced {type(model).__name__} failed on the example inputs: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                         "check the number, shapes and dtypes of the inputs") from exc
    gm.meta[TRACER_KEY] = used
    mode = gm.meta.get(MODE_KEY)
    return Traced(gm, used, tuple(notes) + more, renames,
                  "" if mode is None else ("train" if mode else "eval"))


def _trace_any(model: torch.nn.Module, example_inputs: tuple[Any, ...],
               concrete: dict[str, Any] | None, tracer: str
               ) -> tuple[fx.GraphModule, str, tuple[str, ...], WeightMap]:
    """The first tracer that takes ``model``, its name, its notes and renames."""
    first_error: BaseException | None = None
    if tracer in ("auto", "symbolic"):
        try:
            return _symbolic(model, concrete), "symbolic", (), WeightMap()
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported below
            first_error = exc
            log.info("symbolic_trace failed (%s); trying torch.export", _explain(exc))
            if tracer == "symbolic":
                raise TraceError(f"torch.fx could not trace {type(model).__name__}: "
                                 f"{_explain(exc)}") from exc
    try:
        return export_model(model, example_inputs), "export", (), WeightMap()
    except Exception as exc:  # noqa: BLE001
        export_error = exc
    reason = _explain(first_error) if first_error is not None else _explain(export_error)
    also = ""
    if tracer == "auto":
        from .realtensor import trace_real   # noqa: PLC0415 - the last resort
        try:
            gm, notes, renames = trace_real(model, example_inputs)
            return gm, "realtensor", notes, renames
        except Exception as exc:  # noqa: BLE001
            log.info("real-tensor trace failed: %s", exc)
            also = f"; make_fx also failed: {_explain_fake(exc)}"
    raise TraceError(
        f"could not trace {type(model).__name__}: {reason}; torch.export also failed: "
        f"{_explain_export(model, export_error)}{also}") from export_error


def _explain_export(model: torch.nn.Module, exc: BaseException) -> str:
    """Why export failed, naming a submodule that shadows an ``nn.Module`` method."""
    shadowing = [name for name, _ in model.named_modules()
                 if name and hasattr(torch.nn.Module, name.rsplit(".", 1)[-1])]
    if shadowing:
        return (f"the submodule `{shadowing[0]}` is named like an nn.Module method, which "
                "torch.export cannot get past; rename it")
    return one_line(exc)


def _explain_fake(exc: BaseException) -> str:
    text = one_line(exc)
    if "data-dependent" in text:
        return ("forward branches on tensor values, which no tracer can capture; make the "
                "branch not depend on values, or move it out of forward")
    return text


def alias_note(aliased: tuple[int, ...]) -> str:
    """The note saying which inputs shared memory and were traced on distinct copies."""
    return (f"inputs {', '.join(map(str, aliased))} share memory with an earlier input; "
            "traced on distinct copies, so the graph reads each argument")


def distinct_inputs(inputs: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    """``inputs`` with every tensor that shares memory with an earlier one cloned, and
    the positions of the arguments that held such a tensor. A tracer that sees one tensor
    twice may read one input for both arguments."""
    seen: list[torch.Tensor] = []
    aliased: list[int] = []

    def distinct(x: Any, position: int) -> Any:
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return x
        if any(_overlap(x, y) for y in seen):
            if position not in aliased:
                aliased.append(position)
            x = x.clone()
        seen.append(x)
        return x

    out = tuple(pytree.tree_map(lambda x, i=i: distinct(x, i), value)
                for i, value in enumerate(inputs))
    return out, tuple(aliased)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            return False
    except (RuntimeError, NotImplementedError):
        return a is b
    def span(t: torch.Tensor) -> tuple[int, int]:
        size = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
        start = t.storage_offset() * t.element_size()
        return start, start + size * t.element_size()
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


@contextlib.contextmanager
def _buffers_kept(module: torch.nn.Module) -> Iterator[None]:
    saved = {k: v.detach().clone() for k, v in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for key, buffer in module.named_buffers():
                if key in saved:
                    buffer.copy_(saved[key])


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The traced shape of ``node``'s tensor output, or None when it is not one tensor."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def tensor_dtype(node: fx.Node) -> torch.dtype | None:
    """The traced dtype of ``node``'s tensor output, or None."""
    return getattr(node.meta.get("tensor_meta"), "dtype", None)


traced = trace   # the public name (``fxfuse.trace`` is this package)


def trace_general(model: torch.nn.Module, traced: Traced, example_inputs: Sequence[Any],
                  concrete_args: dict[str, Any] | None) -> tuple[Traced, tuple[str, ...]]:
    """What to return when nothing was rewritten in a non-symbolic graph.

    The symbolic trace when the model has one (module calls kept, so fast paths such as
    ``nn.MultiheadAttention``'s fused kernel stay, and no shape is fixed); otherwise
    ``traced`` with its limits stated.
    """
    try:
        return trace(model, example_inputs, concrete_args=concrete_args,
                     tracer="symbolic"), (
            "nothing rewritten: returned the symbolic trace (module calls and their fast "
            "paths kept) rather than the ATen graph",)
    except TraceError:
        pass
    used = traced.tracer
    return traced, (f"nothing rewritten, and only the {used} route traces this model: the "
                    "returned graph spells modules as ATen ops, so fused module kernels (e.g. "
                    "nn.MultiheadAttention's fast path) are not used; where speed matters, "
                    "keep the original model",)
