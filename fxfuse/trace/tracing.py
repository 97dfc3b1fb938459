"""Turn a model into a GraphModule whose nodes carry shapes.

``torch.fx.symbolic_trace`` first; when it cannot (a loop bound read from the input's
shape, a write into a preallocated tensor), a shape-specialising ``torch.export``
(non-strict) gives an ATen-level graph. The matcher does not care which one it got.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
from typing import Any, Iterator, Sequence

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import TraceError

log = logging.getLogger("fxfuse")

VALUE_KEY = "fxfuse_value"   # node.meta key: concrete non-tensor value seen at trace time
TRACER_KEY = "fxfuse_tracer"  # graph-module attribute naming the tracer used


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


def _symbolic(model: torch.nn.Module, concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    return fx.symbolic_trace(model, concrete_args=concrete_args)


def _export(model: torch.nn.Module, example_inputs: tuple[Any, ...]) -> fx.GraphModule:
    dims = _batch_dynamic_shapes(example_inputs)
    try:
        program = torch.export.export(model, _batch_of_two(example_inputs), dynamic_shapes=dims,
                                      strict=False)
    except Exception:  # noqa: BLE001 - a dynamic batch is a bonus; fall back to static shapes
        program = torch.export.export(model, example_inputs, strict=False)
    return program.module()


def _batch_of_two(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Batch-1 inputs repeated to batch 2: export specialises a size-1 dim to 1, and the
    traced graph would then refuse every other batch size."""
    batched = [x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not batched or any(x.shape[0] != 1 for x in batched):
        return example_inputs
    return tuple(x.expand(2, *x.shape[1:]).clone() if isinstance(x, torch.Tensor) and x.dim() > 0
                 else x for x in example_inputs)


def _batch_dynamic_shapes(example_inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
    batch = torch.export.Dim.AUTO
    specs = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
                  for x in example_inputs)
    return specs


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
    """Trace ``model`` and annotate every node with its shape.

    Args:
        model: the module to trace. It is not modified; the returned GraphModule shares
            its submodules (deep-copy first if you will mutate them).
        example_inputs: positional inputs for one forward call; they fix the shapes the
            matcher reasons about.
        concrete_args: passed to ``torch.fx.symbolic_trace`` to specialise arguments.
        tracer: ``"auto"`` (symbolic, then export), ``"symbolic"`` or ``"export"``.

    Returns:
        A GraphModule whose nodes carry ``meta["tensor_meta"]`` (and, for small
        non-tensor values, ``meta["fxfuse_value"]``), with attribute ``fxfuse_tracer``.

    Raises:
        TraceError: neither tracer could handle the model; the message names the
            construct and the way out.
    """
    if tracer not in ("auto", "symbolic", "export"):
        raise TraceError(f"unknown tracer {tracer!r}; use 'auto', 'symbolic' or 'export'")
    example_inputs = tuple(example_inputs)
    _check_arity(model, example_inputs)
    first_error: BaseException | None = None
    gm: fx.GraphModule | None = None
    used = tracer
    if tracer in ("auto", "symbolic"):
        try:
            gm = _symbolic(model, concrete_args)
            used = "symbolic"
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported below
            first_error = exc
            log.info("symbolic_trace failed (%s); trying torch.export", _explain(exc))
            if tracer == "symbolic":
                raise TraceError(f"torch.fx could not trace {type(model).__name__}: "
                                 f"{_explain(exc)}") from exc
    if gm is None:
        try:
            gm = _export(model, example_inputs)
            used = "export"
        except Exception as exc:  # noqa: BLE001
            reason = _explain(first_error) if first_error is not None else _explain(exc)
            raise TraceError(
                f"could not trace {type(model).__name__}: {reason}; torch.export also failed: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    try:
        # ShapeProp prints its own traceback before raising; the error below says it all.
        with _buffers_kept(gm), contextlib.redirect_stderr(io.StringIO()):
            _RecordingShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:  # noqa: BLE001
        raise TraceError(f"the traced {type(model).__name__} failed on the example inputs: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                         "check the number, shapes and dtypes of the inputs") from exc
    setattr(gm, TRACER_KEY, used)
    return gm


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
