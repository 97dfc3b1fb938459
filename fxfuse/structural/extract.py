"""Cut a loop out of its graph, for ``auto`` to time: the rows alone, and the rows fused.

The cut-out's inputs are what the rows read from outside (plus the model input the
batch size is read from); its outputs are every value the rows leak. The fused cut-out
is the same cut-out with the loop rewritten, so the two compute the same thing.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import fx

from ..errors import CannotTime
from .find import Loop
from .plan import RowPlan
from .reads import RowsRead
from .rewrite import rewrite_loop
from .values import TensorLike


class CannotCut(CannotTime):
    """The loop cannot be run on its own (the message says why)."""


def _inside(loop: Loop) -> set[fx.Node]:
    """The loop's nodes, and the non-tensor ops they read (``split``, ``size``) whose
    own inputs are tensors, so that the cut-out's inputs are all tensors."""
    nodes = set(loop.plan.nodes())
    grown = True
    while grown:
        grown = False
        for node in list(nodes):
            for dep in node.all_input_nodes:
                if dep not in nodes and dep.op in ("call_function", "call_method") \
                        and not isinstance(loop.values.get(dep), TensorLike):
                    nodes.add(dep)
                    grown = True
    return nodes


def _outside(loop: Loop, inside: set[fx.Node]) -> list[fx.Node]:
    found: dict[fx.Node, None] = {}
    for node in sorted(inside, key=_position(loop)):
        for dep in node.all_input_nodes:
            if dep not in inside:
                found.setdefault(dep, None)
    if loop.batch_source is not None:
        found.setdefault(loop.batch_source, None)
    return list(found)


def _position(loop: Loop):
    order = {n: i for i, n in enumerate(loop.join.node.graph.nodes)}
    return order.__getitem__


def cut_out(gm: fx.GraphModule, loop: Loop) -> tuple[fx.GraphModule, Loop, list[fx.Node]]:
    """The rows of ``loop`` as a GraphModule of their own, the loop re-planned on it, and
    the outside nodes its placeholders stand for."""
    graph, env = fx.Graph(), {}
    inside = _inside(loop)
    outside = _outside(loop, inside)
    for node in outside:
        env[node] = graph.placeholder(node.name)
    for node in sorted(inside, key=_position(loop)):
        env[node] = graph.node_copy(node, lambda n: env[n])
    leaks = [b[p] for b in loop.plan.bodies for p in loop.plan.leaks]
    graph.output(tuple(env[n] for n in leaks))
    cut = fx.GraphModule(gm, graph)
    return cut, _moved(loop, env), outside


def _moved(loop: Loop, env: dict[fx.Node, fx.Node]) -> Loop:
    plan = loop.plan
    moved = RowPlan(plan.rows, tuple(env.get(n, n) for n in plan.outputs),
                    tuple(tuple(env[n] for n in b) for b in plan.bodies),
                    tuple(tuple(env[n] for n in r) for r in plan.readers),
                    tuple(tuple(env[n] for n in s) for s in plan.inputs), plan.leaks,
                    plan.padded)
    reads = {k: RowsRead(r.how, tuple(env[n] for n in r.nodes),
                         env.get(r.source) if r.source is not None else None,
                         r.in_dim, r.width, r.narrow) for k, r in loop.reads.items()}
    return dataclasses.replace(loop, plan=moved, reads=reads,
                               batch_source=env.get(loop.batch_source))


def timing_inputs(outside: list[fx.Node], values: dict[fx.Node, Any]) -> tuple[Any, ...]:
    """Random tensors with the traced facts (zeros for integer tensors, which index)."""
    args = []
    for node in outside:
        like = values.get(node)
        if not isinstance(like, TensorLike):
            raise CannotCut(f"`{node.name}` is not a tensor")
        t = like.empty()
        if t.is_floating_point() or t.is_complex():
            t.normal_()
        else:
            t.zero_()
        args.append(t)
    return tuple(args)


def candidates(gm: fx.GraphModule, loop: Loop) -> tuple[fx.GraphModule, fx.GraphModule,
                                                         tuple[Any, ...]]:
    """The loop alone, the loop fused, and inputs to time them on."""
    cut, moved, outside = cut_out(gm, loop)
    inputs = timing_inputs(outside, loop.values)
    try:
        with torch.no_grad():
            cut(*inputs)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise CannotCut(f"the rows alone do not run on random inputs ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from exc
    fused = copy.deepcopy(cut)            # a failure from here on is a bug: it propagates
    fused_loop = _moved(moved, _identity_map(cut, fused))
    rewrite_loop(fused, fused_loop)
    fused.graph.lint()
    fused.recompile()
    return cut, fused, inputs


def _identity_map(a: fx.GraphModule, b: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    return dict(zip(a.graph.nodes, b.graph.nodes))
