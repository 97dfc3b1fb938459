"""Run one row over stacked parameters with ``torch.func.vmap`` and trace it into ATen.

The traced body takes, in order: the stacked tensors, the shared modules' tensors, the
rows' inputs (each batched on its ``in_dim``) and the shared inputs; it returns each
leaked value stacked on dim 0. vmap's batching rules do the fusing: a batched-weight
``conv1d`` becomes one grouped convolution, a batched ``linear`` one ``bmm``.

Some batching rules read the batch size as a number, so the body is traced on fake
tensors at two batch sizes and every integer that differs between the two traces is
rewritten as ``a * batch + c`` of the model's batch, read from its input at run time.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

from .body import RowFunction
from .plan import Refused
from .values import TensorLike


@dataclass(frozen=True)
class Operand:
    """One input of the traced body.

    ``kind``: ``"stacked"`` (a fused tensor, ``name`` in the row function),
    ``"weight"`` (a shared module's tensor at path ``name``), ``"rows"`` (input slot
    ``slot``, batched on ``in_dim``) or ``"shared"`` (input slot ``slot``, the same
    tensor for every row).
    """

    kind: str
    name: str = ""
    slot: int = -1
    in_dim: int | None = None


@dataclass(frozen=True)
class Body:
    """The traced, batch-general body: ``graph_module`` takes ``operands`` (then the
    batch size as an int when ``batched``) and returns one stacked tensor per leak."""

    graph_module: fx.GraphModule
    operands: tuple[Operand, ...]
    batched: bool


def _traced(fn: Callable, args: list[Any]) -> fx.GraphModule:
    try:
        return make_fx(fn, tracing_mode="fake")(*args)
    except Exception as exc:  # noqa: BLE001 - vmap/make_fx refuse in many ways; each is a reason
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "random" in text and "vmap" in text:
            raise Refused("a row draws random numbers (dropout in train mode?); the "
                          "fused rows would draw them in another order") from exc
        raise Refused(f"the row cannot be vectorised: {type(exc).__name__}: "
                      f"{text[:160]}") from exc


def _function(row: RowFunction, operands: tuple[Operand, ...], consts: dict[int, Any],
              n_slots: int) -> Callable:
    """The function to trace: flat operands in, vmap of the row over the stacked ones."""
    shared_inner = {path: key for key, path in row.shared.items()}
    rows_dims = [o.in_dim for o in operands if o.kind == "rows"]

    def fn(*flat: torch.Tensor):
        stacked, weights, batched, shared = {}, {}, {}, {}
        for op, value in zip(operands, flat):
            if op.kind == "stacked":
                stacked[op.name] = value
            elif op.kind == "weight":
                weights[shared_inner[op.name]] = value
            elif op.kind == "rows":
                batched[op.slot] = value
            else:
                shared[op.slot] = value
        slots = list(batched)

        def one(params, *rows):
            given = {**shared, **dict(zip(slots, rows))}
            args = [given[s] if s in given else consts[s] for s in range(n_slots)]
            return functional_call(row.module, {**params, **weights}, tuple(args))

        return vmap(one, in_dims=(0, *rows_dims), randomness="error")(
            stacked, *batched.values())

    return fn


def trace_body(row: RowFunction, operands: tuple[Operand, ...],
               examples: list[dict[int, Any]], batches: list[int],
               weights: dict[str, torch.Tensor]) -> Body:
    """Trace at each example (one per batch size) and merge the traces.

    Args:
        row: the row function and its stacked tensors.
        operands: the body's inputs, in order.
        examples: per batch size, per input slot, the example value (a
            :class:`TensorLike` or a plain value such as a size).
        batches: the batch size of each example.
        weights: the shared modules' tensors, by their path in the model.
    """
    stacked = {s.name: s.value for s in row.stacked}
    n_slots = len(examples[0])
    traces = []
    for example in examples:
        args = [_argument(o, stacked, weights, example) for o in operands]
        consts = {s: v for s, v in example.items() if not isinstance(v, TensorLike)}
        traces.append(_traced(_function(row, operands, consts, n_slots), args))
    if len(traces) == 1:
        return Body(traces[0], operands, False)
    return Body(generalise(traces[0], traces[1], batches[0], batches[1]), operands, True)


def _argument(op: Operand, stacked: dict, weights: dict, example: dict) -> Any:
    if op.kind == "stacked":
        return stacked[op.name]
    if op.kind == "weight":
        return weights[op.name]
    value = example[op.slot]
    return value.empty() if isinstance(value, TensorLike) else value


def generalise(first: fx.GraphModule, second: fx.GraphModule, b1: int, b2: int
               ) -> fx.GraphModule:
    """``first`` with each integer that differs in ``second`` written as ``a * batch + c``
    of a new last placeholder ``batch``.

    Raises:
        Refused: the traces differ in more than batch-linear integers.
    """
    nodes1, nodes2 = list(first.graph.nodes), list(second.graph.nodes)
    if len(nodes1) != len(nodes2):
        raise Refused("the vectorised row changes with the batch size (two traces differ)")
    graph = first.graph
    last = [n for n in nodes1 if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        batch = graph.placeholder("batch")
    exprs: dict[tuple[int, int], fx.Node] = {}

    def expression(a: int, c: int) -> fx.Node:
        if (a, c) not in exprs:
            with graph.inserting_after(batch):
                node = graph.call_function(operator.mul, (batch, a)) if a != 1 else batch
            if c:
                with graph.inserting_after(node):
                    node = graph.call_function(operator.add, (node, c))
            exprs[(a, c)] = node
        return exprs[(a, c)]

    for n1, n2 in zip(nodes1, nodes2):
        if n1.op != n2.op or n1.target != n2.target:
            raise Refused("the vectorised row changes with the batch size "
                          f"({n1.target} vs {n2.target})")
        if n1.op in ("placeholder", "output"):
            continue
        leaves1, spec = pytree.tree_flatten((n1.args, n1.kwargs))
        leaves2, _ = pytree.tree_flatten((n2.args, n2.kwargs))
        merged = [_merge(v1, v2, b1, b2, expression) for v1, v2 in zip(leaves1, leaves2)]
        n1.args, n1.kwargs = pytree.tree_unflatten(merged, spec)
    graph.lint()
    first.recompile()
    return first


def _merge(v1: Any, v2: Any, b1: int, b2: int, expression: Callable) -> Any:
    if isinstance(v1, fx.Node) or v1 == v2 and type(v1) is type(v2):
        return v1
    if isinstance(v1, int) and isinstance(v2, int) and not isinstance(v1, bool):
        a, rem = divmod(v1 - v2, b1 - b2)
        if rem == 0:
            return expression(a, v1 - a * b1)
    raise Refused(f"the vectorised row changes with the batch size ({v1!r} vs {v2!r})")
