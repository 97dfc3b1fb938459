"""Find per-row loops in a traced graph. Pure: reads the graph, never changes it.

Every loop found comes back as a :class:`~fxfuse.sites.RowSite`, fusable or with the
reason it is not, so users can see why a loop was left alone. A loop is H rows, each a
chain of per-row ops (one ``Conv1d``; a tower such as Conv1d → BatchNorm1d → ReLU →
Conv1d; or ``Linear`` heads) reading slices of one tensor, joined by ``cat``, ``stack``
or writes into a preallocated tensor.
"""
from __future__ import annotations

import logging

import torch
from torch import fx

from .candidates import Candidate, find_candidates, walk_back
from .chains import RowChain, family, family_problem, group_rows, key_difference, row_chain
from .params import WeightUses, get_tensor, tied_keys, twin_key
from ..errors import ConfigError
from .reduce import can_reduce, identity_plan, reduce_kind, reduced_plan
from .layout import LayoutError, evaluate, index_tensor, solve_input, solve_output
from .kinds import row_op
from .sites import InputPlan, OutputPlan, RowSite
from ..trace.tracing import tensor_dtype, tensor_shape

log = logging.getLogger("fxfuse")


class _Refuse(Exception):
    """Internal: this candidate cannot be fused, for the reason given."""


def find_row_sites(gm: fx.GraphModule, *, min_rows: int = 2) -> tuple[RowSite, ...]:
    """Find every loop of per-row convolutions (or Linear heads) in ``gm``.

    Args:
        gm: a GraphModule from :func:`fxfuse.trace_model` (nodes carry shapes).
        min_rows: loops with fewer rows are reported but left alone.

    Returns:
        One :class:`RowSite` per loop, in graph order; ``site.reason`` is empty for the
        ones that can be rewritten. An empty tuple when there is no loop.
    """
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
        raise ConfigError(f"min_rows must be a positive int, got {min_rows!r}")
    row_ops = {n for n in gm.graph.nodes if row_op(n, gm) is not None}
    uses = WeightUses(gm)
    claimed: dict[fx.Node, str] = {}
    sites: list[RowSite] = []
    found = []
    for cand in find_candidates(gm.graph, row_ops):
        chains = [row_chain(n, gm) for n in cand.convs]
        if cand.reason or sum(1 for c in chains if c is not None and c.head) >= 2:
            found.append((cand, chains))   # else not a loop of layers (a cat of activations)
    twins = _twins(found)
    for cand, chains in found:
        site = _plan(gm, cand, chains, uses, claimed, min_rows, f"site{len(sites)}",
                     twins.get(_signature(chains), set()))
        if site.fusable:
            claimed.update({gm_node: site.name for c in chains for gm_node in
                            (op.node for op in c.ops)})
        log.info("%s: %d rows at %s: %s", site.name, site.rows, site.where(),
                 site.reason or "fusable")
        sites.append(site)
    return tuple(sites)


def _signature(chains: list[RowChain | None]) -> tuple | None:
    """The weights a loop reads, row by row and step by step (None when not all rows are
    chains)."""
    if any(c is None for c in chains):
        return None
    return twin_key(op for c in chains for op in c.ops)


def _twins(found: list) -> dict[tuple, set[fx.Node]]:
    """Loops that run the very same layers (one loop module applied twice): their nodes,
    by signature. Such loops fuse into one shared fused module, so nothing is untied."""
    twins: dict[tuple, set[fx.Node]] = {}
    counts: dict[tuple, int] = {}
    for _, chains in found:
        sig = _signature(chains)
        if sig is not None and any(sig):
            counts[sig] = counts.get(sig, 0) + 1
            twins.setdefault(sig, set()).update(op.node for c in chains for op in c.ops)
    return {sig: nodes for sig, nodes in twins.items() if counts[sig] > 1}


def _plan(gm: fx.GraphModule, cand: Candidate, chains: list[RowChain | None],
          uses: WeightUses, claimed: dict[fx.Node, str], min_rows: int, name: str,
          twin_nodes: set[fx.Node]) -> RowSite:
    heads = [c.head if c is not None else None for c in chains]
    targets = tuple(h.module or h.param("weight").removesuffix(".weight") if h else "?"
                    for h in heads)
    base = dict(name=name, combine=cand.combine.name, combine_kind=cand.kind,
                convs=tuple(h.node.name if h else "" for h in heads), targets=targets)
    try:
        if cand.reason:
            raise _Refuse(cand.reason)
        good = _check_chains(gm, chains)
        base["loop_kind"] = _loop_kind(good[0], cand.kind)
        base["steps"] = tuple(op.label for op in good[0].ops)
        base["twin"] = _signature(good)
        base["spec"] = next((op.key for op in good[0].ops if op.kind == "conv"), None)
        if len(good) < min_rows:
            raise _Refuse(f"{len(good)} rows, fewer than min_rows={min_rows}")
        taken = [claimed[op.node] for c in good for op in c.ops if op.node in claimed]
        if taken:
            raise _Refuse(f"its rows are already part of {taken[0]}")
        groups = _groups(good)
        _check_ties(gm, good)
        shared = _sharing(good)
        source, in_nodes, in_plan = _plan_input(cand, good)
        reduced = _plan_reduction(cand, good, shared, groups)
        out_plan = reduced[1] if reduced else _plan_output(cand, good)
        site_nodes = {op.node for c in good for op in c.ops}
        if not reduced:
            site_nodes |= twin_nodes      # the twin loop will share the fused module
        # Rows folded into the batch keep calling the shared layers: nothing is untied.
        problem = "" if shared else uses.outside_problem(gm, _param_keys(good), site_nodes)
        if problem:
            raise _Refuse(problem)
    except _Refuse as refusal:
        return RowSite(**base, reason=str(refusal))
    notes = ("all rows share the same modules: rows folded into the batch, weights not "
             "copied",) if shared else ()
    if len(groups) > 1:
        notes += (f"rows differ: fused as {len(groups)} groups of "
                  f"{', '.join(str(len(g)) for g in groups)} rows",)
    if reduced and cand.kind != "sum":
        base.update(combine=reduced[0].name, combine_kind=f"{cand.kind}+{reduced[2]}")
        cand.output_nodes.add(cand.combine)
        cand.combine = reduced[0]
    if reduced:
        kind = base["loop_kind"] if cand.kind == "sum" else \
            base["loop_kind"] + f", {reduced[2]} over rows"
        base.update(reduce=reduced[2], loop_kind=kind)
    inside = cand.output_nodes | {cand.combine}
    exports = [c.output.name for c in good if any(u not in inside for u in c.output.users)]
    if reduced and exports:
        return RowSite(**base, reason="a summed row is also used on its own outside the loop")
    return RowSite(**base, source=source.name, input_plan=in_plan, output_plan=out_plan,
                   row_exports=tuple(exports), input_nodes=tuple(n.name for n in in_nodes),
                   output_nodes=tuple(n.name for n in cand.graph_order(cand.output_nodes)),
                   chains=tuple(tuple(op.node.name for op in c.ops) for c in good),
                   groups=groups, family=family(good[0]), shared_module=shared, notes=notes)


def _loop_kind(chain: RowChain, combine_kind: str) -> str:
    what = chain.head.row_kind.loop_title
    if len(chain.ops) > 1:
        what = f"{what} ({chain.describe()})"
    return f"{what}, {combine_kind}"


def _check_chains(gm: fx.GraphModule, chains: list[RowChain | None]) -> list[RowChain]:
    if any(c is None or c.head is None for c in chains):
        raise _Refuse("some joined tensors are not outputs of a per-row conv or Linear")
    good: list[RowChain] = list(chains)  # type: ignore[arg-type]
    for c in good:
        problem = family_problem(c) or next(
            (p for p in (op.row_kind.module_problem(gm, op) for op in c.ops) if p), "")
        if problem:
            raise _Refuse(problem)
    if len({c.kinds for c in good}) > 1:
        other = next(c for c in good if c.kinds != good[0].kinds)
        raise _Refuse(f"rows run different steps: {good[0].describe()} vs {other.describe()}")
    trainable = {tuple(get_tensor(gm, k).requires_grad for op in c.ops for _, k in op.params)
                 for c in good}
    if len(trainable) > 1:     # one fused tensor has one requires_grad for every row
        raise _Refuse("some rows' weights are frozen (requires_grad=False) and others' are "
                      "not; fusing would change which weights train")
    shape = tensor_shape(good[0].input)
    want = 3 if family(good[0]) == "conv" else 2
    if shape is None or len(shape) != want and not (want == 2 and len(shape) > 2):
        raise _Refuse(f"row inputs are {len(shape or ())}-D; per-row "
                      f"{'Conv1d needs (N, C, L)' if want == 3 else 'Linear needs (N, ..., L)'}")
    return good


def _groups(chains: list[RowChain]) -> tuple[tuple[int, ...], ...]:
    groups = group_rows(chains)
    if len(groups) == 1:
        return groups
    other = chains[groups[1][0]]
    why = f"rows differ: row 0 and row {groups[1][0]} have {key_difference(chains[0], other)}"
    if all(len(g) == 1 for g in groups):
        raise _Refuse(why)
    shapes = {tensor_shape(c.output) for c in chains}
    if len(shapes) != 1:
        raise _Refuse(f"{why}, and their outputs differ in shape")
    return groups


def _sharing(chains: list[RowChain]) -> bool:
    """True when every row runs the very same layers; refuse when only some rows share."""
    shared_steps = []
    for j, op in enumerate(chains[0].ops):
        if not op.params:
            continue
        keys = [c.ops[j].params for c in chains]
        distinct = len(set(keys))
        if 1 < distinct < len(keys):
            raise _Refuse(f"some rows share {chains[0].ops[j].label.split()[0]} weights and "
                          "others do not; fusing would untie them")
        shared_steps.append(distinct == 1 and len(keys) > 1)
    if any(shared_steps) and not all(shared_steps):
        raise _Refuse("rows share some layers but not others; fusing would untie them")
    shared = bool(shared_steps) and all(shared_steps)
    stats = next((op for op in chains[0].ops if op.row_kind.batch_statistics), None)
    if shared and stats is not None:
        raise _Refuse(f"rows share one {stats.row_kind.title}; folding rows into the batch "
                      "would change its statistics in train mode")
    return shared


def _check_ties(gm: fx.GraphModule, chains: list[RowChain]) -> None:
    """Refuse rows whose weights are tied under different names (``layers[1].weight =
    layers[0].weight``, or views of one tensor): fusing copies them apart."""
    tie = tied_keys(gm, _param_keys(chains))
    if tie:
        raise _Refuse(f"{tie[1]} is tied to {tie[0]} (the same tensor or storage); fusing "
                      "would untie them")


def _param_keys(chains: list[RowChain]) -> list[str]:
    return [key for c in chains for op in c.ops for _, key in op.params]


def _plan_input(cand: Candidate, chains: list[RowChain]
                ) -> tuple[fx.Node, list[fx.Node], InputPlan]:
    walks = []
    for chain in chains:
        path, stop = walk_back(chain.input, set())
        walks.append(path + ([stop] if stop is not None else []))
    common = set(walks[0]).intersection(*map(set, walks[1:]))
    source = next((n for n in walks[0] if n in common and tensor_shape(n) is not None), None)
    if source is None:
        ends = sorted({w[-1].name for w in walks if w})
        kinds = {getattr(w[-1].target, "__name__", str(w[-1].target)) for w in walks if w}
        hint = (f"each row starts at its own `{kinds.pop()}`, a per-row op fxfuse does not "
                "fuse, or rows depend on each other") if len(kinds) == 1 and len(ends) > 1 \
            else "rows may depend on each other"
        raise _Refuse(f"rows read different tensors ({', '.join(ends[:3])}): not slices of "
                      f"one input; {hint}")
    if source is cand.combine or source in cand.output_nodes:
        raise _Refuse("rows read the tensor the loop writes: rows depend on each other")
    nodes = {n for w in walks for n in w[:w.index(source)]}
    order = cand.graph_order(nodes)
    try:
        env = evaluate(order, {source: index_tensor(tensor_shape(source))})
        plan = solve_input(tensor_shape(source), [env[c.input] for c in chains])
    except LayoutError as exc:
        raise _Refuse(f"rows are not plain slices of `{source.name}`: {exc}") from exc
    return source, order, plan


def _plan_output(cand: Candidate, chains: list[RowChain]) -> OutputPlan:
    outs = [c.output for c in chains]
    shape = tensor_shape(outs[0])
    if shape is None or any(tensor_shape(n) != shape for n in outs):
        raise _Refuse("the rows' outputs differ in shape")
    dtype, row_dtype = tensor_dtype(cand.combine), tensor_dtype(outs[0])
    if dtype is not None and dtype != row_dtype:
        raise _Refuse(f"the rows are {row_dtype} but are written into a {dtype} tensor")
    _check_rows(chains)
    combine = cand.combine
    nodes = set(cand.output_nodes) if cand.kind == "buffer" else cand.output_nodes | {combine}
    inside = nodes | set(outs) | {combine}
    order = cand.graph_order(nodes)
    for node in order:
        if node is not combine and any(u not in inside for u in node.users):
            user = next(u for u in node.users if u not in inside)
            raise _Refuse(f"per-row intermediate `{node.name}` is also used by `{user.name}`")

    def solve(batch: int) -> OutputPlan:
        rows_shape = (batch, len(outs), *shape[1:])
        fidx = index_tensor(rows_shape)
        env: dict[fx.Node, object] = {n: fidx[:, h] for h, n in enumerate(outs)}
        if cand.kind == "buffer":
            env[combine] = torch.full(tensor_shape(combine) or (), -1, dtype=fidx.dtype)
        return solve_output(rows_shape, evaluate(order, env)[combine])

    try:
        plan = solve(shape[0])
    except LayoutError as exc:
        raise _Refuse(f"rows are not combined as whole rows: {exc}") from exc
    if shape[0] == 1 and cand.kind != "buffer":
        # With one sample, where the batch dim goes (cat on dim 0, say) is ambiguous:
        # solve again with two; keep the first answer when the region fixes the batch.
        try:
            plan = solve(2)
        except LayoutError:
            pass
    return plan


def _plan_reduction(cand: Candidate, chains: list[RowChain], shared: bool,
                    groups: tuple) -> tuple[fx.Node, OutputPlan, str] | None:
    """Rows summed over (``sum(outs)``, ``stack(outs, d).sum(d)``): one dense op."""
    ok = len(groups) == 1 and can_reduce(chains, shared)
    shape = tensor_shape(chains[0].output)
    if cand.kind == "sum":
        if not ok or shape is None or any(tensor_shape(c.output) != shape for c in chains):
            raise _Refuse("rows are summed, which fuses only for one Conv1d (groups=1) or one "
                          "Linear per row, each with its own weights and equal output shapes")
        return cand.combine, identity_plan(len(shape)), "sum"
    users = list(cand.combine.users)
    if not ok or len(users) != 1 or cand.kind == "buffer":
        return None
    found = reduce_kind(users[0])
    if found is None:
        return None
    plan = _plan_output(cand, chains)
    result = tensor_shape(cand.combine)
    new_plan = reduced_plan(plan, len(result or ()), found[1]) if result else None
    return (users[0], new_plan, found[0]) if new_plan else None


def _check_rows(chains: list[RowChain]) -> None:
    """Each step's own check of its rows (e.g. BatchNorm batch counters agree)."""
    root = chains[0].output.graph.owning_module
    for j, op in enumerate(chains[0].ops):
        problem = op.row_kind.rows_problem(root, [c.ops[j] for c in chains])
        if problem:
            raise _Refuse(problem)
