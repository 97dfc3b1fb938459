"""Find per-row Conv1d loops in a traced graph. Pure: reads the graph, never changes it.

Every loop found comes back as a :class:`~fxfuse.sites.RowSite`, fusable or with the
reason it is not, so users can see why a loop was left alone.
"""
from __future__ import annotations

import logging

import torch
from torch import fx

from .candidates import Candidate, find_candidates, walk_back
from .convspec import WeightUses, conv_spec, input_problem, module_problem
from .errors import ConfigError
from .layout import LayoutError, evaluate, index_tensor, solve_input, solve_output
from .ops import ConvCall, conv_call
from .sites import InputPlan, OutputPlan, RowSite
from .tracing import tensor_dtype, tensor_shape

log = logging.getLogger("fxfuse")


class _Refuse(Exception):
    """Internal: this candidate cannot be fused, for the reason given."""


def find_row_sites(gm: fx.GraphModule, *, min_rows: int = 2) -> tuple[RowSite, ...]:
    """Find every loop of per-row convolutions in ``gm``.

    Args:
        gm: a GraphModule from :func:`fxfuse.trace_model` (nodes carry shapes).
        min_rows: loops with fewer rows are reported but left alone.

    Returns:
        One :class:`RowSite` per loop, in graph order; ``site.reason`` is empty for the
        ones that can be rewritten. An empty tuple when there is no loop.
    """
    if not isinstance(min_rows, int) or min_rows < 1:
        raise ConfigError(f"min_rows must be a positive int, got {min_rows!r}")
    calls = {n: c for n in gm.graph.nodes if (c := conv_call(n, gm)) is not None}
    uses = WeightUses(gm)
    claimed: dict[fx.Node, str] = {}
    sites: list[RowSite] = []
    for cand in find_candidates(gm.graph, set(calls)):
        site = _plan(gm, cand, calls, uses, claimed, min_rows, f"site{len(sites)}")
        if site.fusable:
            claimed.update({n: site.name for n in cand.convs})
        log.info("%s: %d rows at %s: %s", site.name, site.rows, site.where(),
                 site.reason or "fusable")
        sites.append(site)
    return tuple(sites)


def _plan(gm: fx.GraphModule, cand: Candidate, calls: dict[fx.Node, ConvCall],
          uses: WeightUses, claimed: dict[fx.Node, str], min_rows: int, name: str) -> RowSite:
    rows = [calls[n] for n in cand.convs]
    targets = tuple(c.module_target or c.weight_key.removesuffix(".weight") for c in rows)
    base = dict(name=name, combine=cand.combine.name, combine_kind=cand.kind,
                convs=tuple(n.name for n in cand.convs), targets=targets)
    try:
        if cand.reason:
            raise _Refuse(cand.reason)
        if len(rows) < min_rows:
            raise _Refuse(f"{len(rows)} rows, fewer than min_rows={min_rows}")
        taken = [claimed[n] for n in cand.convs if n in claimed]
        if taken:
            raise _Refuse(f"its convs are already part of {taken[0]}")
        spec = _common_spec(gm, rows, targets)
        shared = _sharing(rows, targets)
        problem = uses.outside_problem(gm, _weight_keys(rows, shared), set(cand.convs))
        if problem:
            raise _Refuse(problem)
        source, in_nodes, in_plan = _plan_input(cand, rows)
        out_plan = _plan_output(cand, spec)
        exports = _row_exports(cand)
    except _Refuse as refusal:
        spec = None
        try:
            spec = _common_spec(gm, rows, targets) if rows else None
        except _Refuse:
            pass
        return RowSite(**base, spec=spec, reason=str(refusal))
    notes = ("all rows share one module: rows folded into the batch, weights not copied",) \
        if shared else ()
    return RowSite(**base, source=source.name, spec=spec, input_plan=in_plan,
                   output_plan=out_plan, row_exports=tuple(n.name for n in exports),
                   input_nodes=tuple(n.name for n in in_nodes),
                   output_nodes=tuple(n.name for n in sorted(cand.output_nodes, key=_pos(gm))),
                   shared_module=shared, notes=notes)


def _pos(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__


def _common_spec(gm: fx.GraphModule, rows: list[ConvCall], targets: tuple[str, ...]):
    for call in rows:
        problem = module_problem(gm, call) or input_problem(call)
        if problem:
            raise _Refuse(problem)
    specs = [conv_spec(gm, c) for c in rows]
    for i, spec in enumerate(specs[1:], start=1):
        diff = specs[0].differences(spec)
        if diff:
            fields = ", ".join(f"{f} {getattr(specs[0], f)!r} vs {getattr(spec, f)!r}" for f in diff)
            raise _Refuse(f"rows differ: {targets[0]} and {targets[i]} have {fields}")
    return specs[0]


def _sharing(rows: list[ConvCall], targets: tuple[str, ...]) -> bool:
    """True when every row calls the same conv; refuse when only some rows share."""
    keys = [(c.weight_key, c.bias_key) for c in rows]
    if len(set(keys)) == 1:
        return True
    if len(set(keys)) != len(keys):
        first = next(i for i, k in enumerate(keys) if keys.count(k) > 1)
        raise _Refuse(f"some rows share {targets[first]} and others do not; "
                      "fusing would untie their weights")
    return False


def _weight_keys(rows: list[ConvCall], shared: bool) -> list[str]:
    keys = [k for c in rows for k in (c.weight_key, c.bias_key) if k]
    return keys[:2] if shared else keys


def _plan_input(cand: Candidate, rows: list[ConvCall]) -> tuple[fx.Node, list[fx.Node], InputPlan]:
    chains = []
    for call in rows:
        path, stop = walk_back(call.input, set())
        chains.append(path + ([stop] if stop is not None else []))
    common = set(chains[0]).intersection(*map(set, chains[1:]))
    source = next((n for n in chains[0] if n in common and tensor_shape(n) is not None), None)
    if source is None:
        ends = sorted({c[-1].name for c in chains if c})
        raise _Refuse(f"rows read different tensors ({', '.join(ends[:3])}): "
                      "not slices of one input (rows may depend on each other)")
    if source is cand.combine or source in cand.output_nodes:
        raise _Refuse("rows read the tensor the loop writes: rows depend on each other")
    nodes = {n for chain in chains for n in chain[:chain.index(source)]}
    order = [n for n in source.graph.nodes if n in nodes]
    try:
        env = evaluate(order, {source: index_tensor(tensor_shape(source))})
        plan = solve_input(tensor_shape(source), [env[c.input] for c in rows])
    except LayoutError as exc:
        raise _Refuse(f"rows are not plain slices of `{source.name}`: {exc}") from exc
    return source, order, plan


def _plan_output(cand: Candidate, spec) -> OutputPlan:
    shape = tensor_shape(cand.convs[0])
    if shape is None or any(tensor_shape(n) != shape for n in cand.convs):
        raise _Refuse("the rows' outputs differ in shape")
    dtype = tensor_dtype(cand.combine)
    if dtype is not None and dtype != spec.dtype:
        raise _Refuse(f"the rows are {spec.dtype} but are written into a {dtype} tensor")
    rows_shape = (shape[0], len(cand.convs), shape[1], shape[2])
    fidx = index_tensor(rows_shape)
    env: dict[fx.Node, object] = {n: fidx[:, h] for h, n in enumerate(cand.convs)}
    combine = cand.combine
    if cand.kind == "buffer":
        env[combine] = torch.full(tensor_shape(combine) or (), -1, dtype=fidx.dtype)
        nodes = cand.output_nodes
    else:
        nodes = cand.output_nodes | {combine}
    order = [n for n in combine.graph.nodes if n in nodes]
    inside = nodes | set(cand.convs) | {combine}
    for node in order:
        if node is not combine and any(u not in inside for u in node.users):
            user = next(u for u in node.users if u not in inside)
            raise _Refuse(f"per-row intermediate `{node.name}` is also used by `{user.name}`")
    try:
        result = evaluate(order, env)[combine]
        return solve_output(rows_shape, result)
    except LayoutError as exc:
        raise _Refuse(f"rows are not combined as whole rows: {exc}") from exc


def _row_exports(cand: Candidate) -> list[fx.Node]:
    inside = cand.output_nodes | {cand.combine}
    return [n for n in cand.convs if any(u not in inside for u in n.users)]
