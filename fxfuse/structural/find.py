"""Find loops of identical rows by structure, and plan each as one vectorised body.

For every join (:mod:`seeds`) the joined tensors are split into rows (:mod:`rows`);
rows with equal signatures (:mod:`signature`) that run at least one layer are a loop.
Each loop is planned (:mod:`plan`), its row built as a function (:mod:`body`), its
reads decided (:mod:`reads`) and its vectorised body traced (:mod:`vectorise`), all
without changing the graph. A loop that cannot be vectorised comes back with the reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .body import RowFunction, row_function
from .bounds import find_bounds
from .graphfacts import dependencies, writers
from .padding import check_padding
from .plan import Refused, RowPlan, group_rows, has_parameters, plan_rows
from .reads import RowsRead, example_of, plan_read
from .rows import RowSplit, split_rows
from .seeds import Join, find_joins
from .signature import row_signature
from .values import Probe, TensorLike, probe
from .vectorise import Body, Operand, trace_body

log = logging.getLogger("fxfuse")


@dataclass
class Loop:
    """A loop of identical rows as found: where it is joined, its plan, its body (or
    the reason it cannot be fused)."""

    join: Join
    plan: RowPlan | None
    reason: str = ""
    row: RowFunction | None = None
    body: Body | None = None
    reads: dict[int, RowsRead] = field(default_factory=dict)
    batch_source: fx.Node | None = None
    row_ndims: tuple[int, ...] = ()
    values: dict[fx.Node, Any] = field(default_factory=dict)
    fixed_mode: str = ""     # "train"/"eval": the rows depend on the mode; the body fixes it
    cuts: tuple = ()         # padded rows: per row, per leak, the (dim, size) narrows
    bounds: tuple = ()       # the index inputs guarded to each row's bound (bounds.py)


def find_loops(gm: fx.GraphModule, inputs: tuple[Any, ...], claimed: set[fx.Node],
               min_rows: int, *, batched: tuple[bool, ...] | None = None) -> list[Loop]:
    """Every loop of identical rows in ``gm`` not already claimed, planned and traced
    (``batched``: which inputs carry the batch; ``None``: every tensor input)."""
    deps = dependencies(gm)
    order = list(gm.graph.nodes)
    loops: list[Loop] = []
    taken = set(claimed)
    splits: dict[int, RowSplit] = {}
    for join, split, rows in _candidates(gm, order, deps, min_rows):
        if not rows:
            i, j = split.carried[0]
            loops.append(Loop(join, None, f"loop-carried: row {i} reads row {j}'s result "
                                          f"(`{split.outputs[j].name}`)"))
            continue
        if {n for r in rows for n in split.bodies[r]} & taken:
            continue
        loop = _planned(gm, join, split, rows)
        if loop.plan is not None:
            taken |= loop.plan.nodes()
            splits[id(loop)] = split
        loops.append(loop)
    _vectorise_all(gm, inputs, [lp for lp in loops if lp.plan is not None], batched)
    return _unpadded(gm, inputs, loops, splits, min_rows, batched)


def _planned(gm: fx.GraphModule, join: Join, split: RowSplit, rows: list[int]) -> Loop:
    try:
        plan = plan_rows(split, rows, gm)
        _check_untied(plan, gm, {n for r in rows for n in split.bodies[r]})
    except Refused as exc:
        return Loop(join, None, str(exc))
    return Loop(join, plan)


def _unpadded(gm: fx.GraphModule, inputs: tuple[Any, ...], loops: list[Loop],
              splits: dict[int, RowSplit], min_rows: int, batched) -> list[Loop]:
    """Padded rows that cannot be one loop keep the reason, and their rows of equal
    sizes are loops of their own, as without padding."""
    out, again = [], []
    for lp in loops:
        if lp.plan is None or not lp.plan.padded or not lp.reason:
            out.append(lp)
            continue
        out.append(Loop(lp.join, None, lp.reason))
        split = splits[id(lp)]
        classes: dict[tuple, list[int]] = {}
        for r in lp.plan.rows:
            classes.setdefault(row_signature(split.bodies[r], gm), []).append(r)
        for rows in (c for c in classes.values() if len(c) >= min_rows):
            again.append(_planned(gm, lp.join, split, rows))
    _vectorise_all(gm, inputs, [lp for lp in again if lp.plan is not None], batched)
    return out + again


def _candidates(gm: fx.GraphModule, order, deps, min_rows: int):
    """(join, split, rows) for each class of identical rows that run a layer, the
    largest first."""
    found, carried, writes = [], [], writers(gm)
    for join in find_joins(gm, min_rows):
        split = split_rows(list(join.tensors), order, deps, writes)
        classes = [r for r in group_rows(split, gm, min_rows) if has_parameters(split.bodies[r[0]])]
        found += [(join, split, rows) for rows in classes]
        if not classes and join.kind in ("cat", "stack", "buffer") and \
                _carried_loop(split, min_rows):
            carried.append((join, split, []))
    found.sort(key=lambda c: -sum(len(c[1].bodies[r]) for r in c[2]))
    return found + carried


def _carried_loop(split, min_rows: int) -> bool:
    """The joined tensors are a chain of layers, each reading the one before: a
    recurrence (``h = f_i(h)``), not rows."""
    feeders = {j for _, j in split.carried
               if split.outputs[j].op not in ("placeholder", "get_attr")}
    layered = any(n.op in ("call_module", "get_attr") for b in split.bodies for n in b)
    rows = len(split.outputs)
    return rows >= max(3, min_rows) and len(feeders) == rows - 1 and layered


def _tensors_of(gm: fx.GraphModule, node: fx.Node) -> dict[int, str]:
    """id -> name of the tensors a ``call_module`` / ``get_attr`` node reads."""
    target = str(node.target)
    if node.op == "call_module":
        module = gm.get_submodule(target)
        return {id(t): f"{target}.{n}" for n, t in
                [*module.named_parameters(remove_duplicate=False),
                 *module.named_buffers(remove_duplicate=False)]}
    value = _lookup(gm, target)
    return {id(value): target} if isinstance(value, torch.Tensor) else {}


def _check_untied(plan: RowPlan, gm: fx.GraphModule, inside: set[fx.Node]) -> None:
    """The rows' modules must run as they are (no hooks, no parametrizations), and a
    per-row tensor read outside the loop would lose its tie to the stacked copy."""
    mine: dict[int, str] = {}
    for body in plan.bodies:
        for node in body:
            if node.op == "call_module":
                _check_module(gm, str(node.target))
            if node.op in ("call_module", "get_attr"):
                mine.update(_tensors_of(gm, node))
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr") and node not in inside:
            for key, name in _tensors_of(gm, node).items():
                if key in mine:
                    raise Refused(f"`{mine[key]}` is also used outside the loop (as "
                                  f"`{name}`, by `{node.name}`)")


def _check_module(gm: fx.GraphModule, target: str) -> None:
    module = gm.get_submodule(target)
    for sub_name, sub in module.named_modules():
        where = f"{target}.{sub_name}" if sub_name else target
        if sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks \
                or getattr(sub, "_backward_pre_hooks", None):
            raise Refused(f"`{where}` has forward hooks, which a fused module would not run")
        if getattr(sub, "parametrizations", None):
            raise Refused(f"`{where}` has parametrizations, which a fused module would lose")


def _vectorise_all(gm: fx.GraphModule, inputs: tuple[Any, ...], loops: list[Loop],
                   batched: tuple[bool, ...] | None = None) -> None:
    """Record what the rows read (one run per batch size), then trace each body."""
    if not loops:
        return
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    keep = frozenset(n for lp in loops if lp.plan.padded for s in lp.plan.inputs for n in s)
    values = probe(gm, inputs, set(placeholders).union(*(_wanted(lp.plan) for lp in loops)),
                   batched=batched, keep=keep)
    for lp in loops:
        try:
            _vectorise(gm, lp, values, placeholders)
        except Refused as exc:
            lp.reason = str(exc)
        log.info("rows at %s: %s", lp.join.node.name, lp.reason or "vectorised")


def _wanted(plan: RowPlan) -> set[fx.Node]:
    """The values a plan needs recorded: what the rows read (and what those read, two
    steps up, for the probes of the reads), the readers and the leaked values."""
    wanted: set[fx.Node] = set()
    for node in [n for slot in plan.inputs for n in slot] + [n for r in plan.readers for n in r]:
        wanted.add(node)
        for dep in node.all_input_nodes:
            wanted.add(dep)
            wanted.update(dep.all_input_nodes)
    wanted.update(b[p] for b in plan.bodies for p in plan.leaks)
    return wanted


def _batch_source(values: Probe, placeholders: list[fx.Node]) -> fx.Node | None:
    for node in placeholders:
        a, b = values.first.get(node), values.second.get(node)
        if isinstance(a, TensorLike) and isinstance(b, TensorLike) and a.shape and b.shape \
                and a.shape[0] == values.batch1 and b.shape[0] == values.batch2:
            return node
    return None


def _vectorise(gm: fx.GraphModule, lp: Loop, values: Probe, placeholders) -> None:
    plan = lp.plan
    row = row_function(plan, gm)
    operands = [Operand("stacked", s.name) for s in row.stacked]
    operands += [Operand("weight", path) for path in row.shared.values()]
    runs = [values.first] + ([values.second] if values.second else [])
    examples: list[dict[int, Any]] = [{} for _ in runs]
    for slot, nodes in enumerate(plan.inputs):
        operand = _slot(lp, slot, nodes, runs, examples)
        if operand is not None:
            operands.append(operand)
    lp.batch_source = _batch_source(values, placeholders)
    if len(runs) == 2 and lp.batch_source is None:
        runs, examples = runs[:1], examples[:1]
    weights = {path: _lookup(gm, path) for path in row.shared.values()}
    batches = [values.batch1, values.batch2][:len(runs)]
    _check_padded(lp, row, values, weights)
    lp.body = trace_body(row, tuple(operands), examples, batches, weights)
    if _mode_dependent(row, tuple(operands), examples[0], weights, lp.body):
        lp.fixed_mode = "train" if any(m.training for m in row.module.modules()
                                       if m is not row.module) else "eval"
    lp.row = row
    lp.values = values.first
    lp.row_ndims = tuple(len(values.first[plan.bodies[0][p]].shape) for p in plan.leaks)


def _check_padded(lp: Loop, row: RowFunction, values: Probe, weights) -> None:
    """Padded rows: padding must be exact (the cuts that slice each row back); all rows:
    the index inputs that must keep each row's bound (run on the values the rows read)."""
    plan = lp.plan
    args = [[values.kept.get(n, values.first.get(n)) for n in (s[r] for s in plan.inputs)]
            for r in range(plan.size)]
    if plan.padded:
        lp.cuts = check_padding(row, plan, args, weights)
    lp.bounds = find_bounds(row, args, weights)


def _slot(lp: Loop, slot: int, nodes: tuple[fx.Node, ...], runs: list[dict],
          examples: list[dict[int, Any]]) -> Operand | None:
    """Input ``slot``'s operand (``None`` for a shared number, passed as a constant),
    with its example value at each batch size filled into ``examples``."""
    if any(nodes[0] not in run for run in runs):
        raise Refused(f"`{nodes[0].name}` did not run on the example inputs")
    if lp.plan.shared(slot):
        for k, run in enumerate(runs):
            examples[k][slot] = run[nodes[0]]
        return Operand("shared", slot=slot) if isinstance(runs[0][nodes[0]], TensorLike) else None
    if not all(isinstance(runs[0][n], TensorLike) for n in nodes):
        raise Refused(f"rows read different non-tensor values (`{nodes[0].name}`, ...)")
    read = plan_read(nodes, runs[0])
    lp.reads[slot] = read
    for k, run in enumerate(runs):
        examples[k][slot] = example_of(read, run)
    return Operand("rows", slot=slot, in_dim=read.in_dim)


def _mode_dependent(row: RowFunction, operands, example, weights, body: Body) -> bool:
    """The row runs differently in train and eval mode (batch norm, dropout): the
    vectorised body, traced in the model's mode, fixes that mode."""
    modules = [m for m in row.module.modules() if m is not row.module]
    if not modules:
        return False
    modes = [m.training for m in modules]
    for m, mode in zip(modules, modes):
        m.training = not mode
    try:
        other = trace_body(row, operands, [example], [0], weights).graph_module
    except Refused:             # random in the other mode: dropout
        return True
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode
    return _ops(body.graph_module) != _ops(other)


def _ops(traced: fx.GraphModule) -> list:
    """The ATen calls with their constant arguments (a mode shows in a flag)."""
    return [(n.target, [a for a in pytree.tree_leaves((n.args, n.kwargs))
                        if isinstance(a, (bool, float, str))])
            for n in traced.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]


def _lookup(gm: fx.GraphModule, path: str) -> torch.Tensor:
    owner, _, name = path.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)
