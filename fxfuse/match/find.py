"""Find per-row loops in a traced graph. Pure: reads the graph, never changes it.

Every loop found comes back as a :class:`~fxfuse.match.sites.RowSite`, fusable or with
the reason it is not, so users can see why a loop was left alone. A loop is H rows, each
a chain of per-row ops (one ``Conv1d``; a tower such as Conv1d → BatchNorm1d → ReLU →
Conv1d; or ``Linear`` heads) reading slices of one tensor, joined by ``cat``, ``stack``,
writes into a preallocated tensor, or a sum.

Planning a loop is a sequence of named checks (:func:`_match`); each returns what it
found or raises :class:`Refused` with the reason, which becomes ``site.reason``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

from ..errors import ConfigError
from ..trace.tracing import tensor_dtype, tensor_shape
from .candidates import Candidate, find_candidates, walk_back
from .chains import RowChain, family, family_problem, group_rows, key_difference, row_chain
from .kernels import mixed_kernels, padded_note
from .kinds import row_op
from .layout import LayoutError, evaluate, index_tensor, solve_feature_input, solve_input, \
    solve_output
from .params import WeightUses, get_tensor, tied_keys, twin_key
from .reduce import can_reduce, identity_plan, reduce_kind, reduced_plan
from .sites import ConvSpec, InputPlan, OutputPlan, RowMatch, RowSite

log = logging.getLogger("fxfuse")


class Refused(Exception):
    """A check failed: this loop cannot be fused, for the reason given."""


@dataclass(frozen=True)
class _Context:
    """What every check of one graph may read."""

    gm: fx.GraphModule
    uses: WeightUses
    claimed: dict[fx.Node, str]      # per-row op nodes already part of a fusable site
    min_rows: int


@dataclass(frozen=True)
class Reduction:
    """Rows summed or averaged over: the node giving the result, its layout, the kind."""

    node: fx.Node
    plan: OutputPlan
    kind: str


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
    ctx = _Context(gm, WeightUses(gm), {}, min_rows)
    found = _loops(gm)
    twins = _twins(found)
    sites: list[RowSite] = []
    for cand, chains in found:
        site = _plan(ctx, cand, chains, f"site{len(sites)}",
                     twins.get(_signature(chains), set()))
        if site.fusable:
            ctx.claimed.update({op.node: site.name for c in chains for op in c.ops})
        log.info("%s: %d rows at %s: %s", site.name, site.rows, site.where(),
                 site.reason or "fusable")
        sites.append(site)
    return tuple(sites)


def _loops(gm: fx.GraphModule) -> list[tuple[Candidate, list[RowChain | None]]]:
    """The candidates that are loops of layers (not, say, a cat of activations), with
    each row's chain."""
    row_ops = {n for n in gm.graph.nodes if _ends_row(n, gm)}
    found = []
    for cand in find_candidates(gm.graph, row_ops):
        chains = [row_chain(n, gm) for n in cand.convs]
        if _is_loop(cand, chains):
            found.append((cand, chains))
    inside = _inside_chains(found)
    return [(cand, chains) for cand, chains in found if cand.combine not in inside]


def _is_loop(cand: Candidate, chains: list[RowChain | None]) -> bool:
    """A refused candidate, or one with at least two rows that start with a layer."""
    return bool(cand.reason) or sum(1 for c in chains if c is not None and c.head) >= 2


def _inside_chains(found: list) -> set[fx.Node]:
    """The nodes inside the found loops' linked chains (all steps but each row's last)."""
    return {op.node for _, chains in found for c in chains
            if c is not None and c.links for op in c.ops[:-1]}


def _ends_row(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A per-row op that can end a row (an op on two tensors only when they are the same
    row's: a gate or a residual inside a row, not a sum across rows)."""
    op = row_op(node, gm)
    return op is not None and (op.kind != "binary" or row_chain(node, gm) is not None)


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


def _plan(ctx: _Context, cand: Candidate, chains: list[RowChain | None], name: str,
          twin_nodes: set[fx.Node]) -> RowSite:
    """The site for one candidate: fusable, or refused with the first failed check."""
    heads = [c.head if c is not None else None for c in chains]
    facts = dict(name=name, combine=cand.combine.name, combine_kind=cand.kind,
                 convs=tuple(h.node.name if h else "" for h in heads),
                 targets=tuple(h.module or h.param("weight").removesuffix(".weight")
                               if h else "?" for h in heads))
    try:
        if cand.reason:
            raise Refused(cand.reason)
        good = _check_chains(ctx.gm, chains)
        facts.update(_describe_rows(good, cand.kind))
        return _match(ctx, cand, good, facts, twin_nodes)
    except Refused as refusal:
        return RowSite(RowMatch(**facts, reason=str(refusal)))


def _describe_rows(chains: list[RowChain], combine_kind: str) -> dict:
    """What every site with checked rows reports, fusable or not."""
    first = chains[0]
    what = first.head.row_kind.loop_title
    if len(first.ops) > 1:
        what = f"{what} ({first.describe()})"
    return dict(loop_kind=f"{what}, {combine_kind}", steps=tuple(op.label for op in first.ops),
                spec=next((op.key for op in first.ops if isinstance(op.key, ConvSpec)), None),
                twin=_signature(chains))


def _match(ctx: _Context, cand: Candidate, good: list[RowChain], facts: dict,
           twin_nodes: set[fx.Node]) -> RowSite:
    """Run the checks that need well-formed rows; the fusable site, or :class:`Refused`."""
    _check_count(good, ctx.min_rows)
    _check_unclaimed(good, ctx.claimed)
    groups = _groups(good)
    _check_ties(ctx.gm, good)
    shared = _sharing(good)
    source, in_nodes, in_plan = _plan_input(cand, good)
    reduced = _plan_reduction(cand, good, shared, groups)
    out_plan = reduced.plan if reduced else _plan_output(cand, good)
    _check_untied(ctx, good, shared, set() if reduced else twin_nodes)
    facts, combine, region = _joined_by(cand, reduced, facts)
    exports = [c.output.name for c in good
               if any(u not in region | {combine} for u in c.output.users)]
    if reduced and exports:
        return RowSite(RowMatch(**facts, reason="a summed row is also used on its own "
                                                "outside the loop"))
    match = RowMatch(**facts, source=source.name, input_plan=in_plan, output_plan=out_plan,
                     row_exports=tuple(exports), input_nodes=tuple(n.name for n in in_nodes),
                     output_nodes=tuple(n.name for n in cand.graph_order(region)),
                     chains=tuple(tuple(op.node.name for op in c.ops) for c in good),
                     groups=groups, family=family(good[0]), shared_module=shared)
    padded = padded_note(good) if len(groups) == 1 else ()
    return RowSite(match, notes=_notes(shared, groups) + padded)


def _joined_by(cand: Candidate, reduced: Reduction | None, facts: dict
               ) -> tuple[dict, fx.Node, set[fx.Node]]:
    """The site's facts, the node whose result replaces the loop's, and the nodes between
    the rows and it. A stack reduced over its rows is joined by the reduction."""
    combine, region = cand.combine, set(cand.output_nodes)
    if not reduced:
        return facts, combine, region
    over = f", {reduced.kind} over rows" if cand.kind != "sum" else ""
    facts = {**facts, "reduce": reduced.kind, "loop_kind": facts["loop_kind"] + over}
    if cand.kind != "sum":
        region.add(combine)
        combine = reduced.node
        facts.update(combine=combine.name, combine_kind=f"{cand.kind}+{reduced.kind}")
    return facts, combine, region


def _notes(shared: bool, groups: tuple[tuple[int, ...], ...]) -> tuple[str, ...]:
    notes = ("all rows share the same modules: rows folded into the batch, weights not "
             "copied",) if shared else ()
    if len(groups) > 1:
        notes += (f"rows differ: fused as {len(groups)} groups of "
                  f"{', '.join(str(len(g)) for g in groups)} rows",)
    return notes


# ---------------------------------------------------------------- checks on the rows

def _check_chains(gm: fx.GraphModule, chains: list[RowChain | None]) -> list[RowChain]:
    """Every row is a chain of known per-row ops, the same steps, ready to fuse."""
    if any(c is None or c.head is None for c in chains):
        raise Refused("some joined tensors are not outputs of a per-row conv or Linear")
    good: list[RowChain] = list(chains)  # type: ignore[arg-type]
    _check_not_carried(good)
    for c in good:
        _check_modules(gm, c)
    _check_same_steps(good)
    _check_trainable(gm, good)
    _check_row_ndim(good)
    return good


def _check_not_carried(chains: list[RowChain]) -> None:
    """A row whose input is computed from another row's ops (directly, or through a
    ``split``, an add, ...) must wait for that row: the loop is loop-carried."""
    owner = {op.node: h for h, c in enumerate(chains) for op in c.ops}
    for h, chain in enumerate(chains):
        seen, pending = set(), [chain.input]
        while pending:
            node = pending.pop()
            if node in seen:
                continue
            seen.add(node)
            if owner.get(node, h) != h:
                raise Refused(f"the loop is loop-carried: row {h} reads `{node.name}`, computed "
                              f"by row {owner[node]}: rows depend on each other")
            pending.extend(node.all_input_nodes)


def _check_modules(gm: fx.GraphModule, chain: RowChain) -> None:
    problem = family_problem(chain) or next(
        (p for p in (op.row_kind.module_problem(gm, op) for op in chain.ops) if p), "")
    if problem:
        raise Refused(problem)


def _check_same_steps(chains: list[RowChain]) -> None:
    other = next((c for c in chains if c.kinds != chains[0].kinds), None)
    if other is not None:
        raise Refused(f"rows run different steps: {chains[0].describe()} vs {other.describe()}")


def _check_trainable(gm: fx.GraphModule, chains: list[RowChain]) -> None:
    trainable: dict[tuple[int, str], set[bool]] = {}   # rows differing in having a bias
    for c in chains:                                  # are told apart by their keys
        for j, op in enumerate(c.ops):
            for role, k in op.params:
                trainable.setdefault((j, role), set()).add(get_tensor(gm, k).requires_grad)
    if any(len(flags) > 1 for flags in trainable.values()):   # one fused tensor: one flag
        raise Refused("some rows' weights are frozen (requires_grad=False) and others' are "
                      "not; fusing would change which weights train")


def _check_row_ndim(chains: list[RowChain]) -> None:
    shape = tensor_shape(chains[0].input)
    conv = family(chains[0]) == "conv"
    if shape is None or (len(shape) != 3 if conv else len(shape) < 2):
        raise Refused(f"row inputs are {len(shape or ())}-D; per-row "
                      f"{'Conv1d needs (N, C, L)' if conv else 'Linear needs (N, ..., L)'}")


def _check_count(chains: list[RowChain], min_rows: int) -> None:
    if len(chains) < min_rows:
        raise Refused(f"{len(chains)} rows, fewer than min_rows={min_rows}")


def _check_unclaimed(chains: list[RowChain], claimed: dict[fx.Node, str]) -> None:
    taken = [claimed[op.node] for c in chains for op in c.ops if op.node in claimed]
    if taken:
        raise Refused(f"its rows are already part of {taken[0]}")


def _groups(chains: list[RowChain]) -> tuple[tuple[int, ...], ...]:
    """Rows with equal keys, fused group by group; refused when no two rows agree."""
    groups = group_rows(chains)
    if len(groups) == 1:
        return groups
    # rows differ only in kernel size, some alone in their group: pad them, one group
    padded = mixed_kernels(chains) if any(len(g) == 1 for g in groups) else None
    if isinstance(padded, list):
        return (tuple(range(len(chains))),)
    other = chains[groups[1][0]]
    why = f"rows differ: row 0 and row {groups[1][0]} have {key_difference(chains[0], other)}"
    if all(len(g) == 1 for g in groups):
        raise Refused(f"{why}; {padded}" if padded else why)
    if len({tensor_shape(c.output) for c in chains}) != 1:
        raise Refused(f"{why}, and their outputs differ in shape")
    return groups


def _check_ties(gm: fx.GraphModule, chains: list[RowChain]) -> None:
    """Refuse rows whose weights are tied under different names (``layers[1].weight =
    layers[0].weight``, or overlapping views of one tensor): fusing copies them apart."""
    tie = tied_keys(gm, _param_keys(chains))
    if tie:
        raise Refused(f"{tie[1]} is tied to {tie[0]} (the same tensor or storage); fusing "
                      "would untie them")


def _sharing(chains: list[RowChain]) -> bool:
    """True when every row runs the very same layers; refuse when only some rows share."""
    shared_steps = []
    for j, op in enumerate(chains[0].ops):
        if not op.params:
            continue
        distinct = len({c.ops[j].params for c in chains})
        if 1 < distinct < len(chains):
            raise Refused(f"some rows share {op.label.split()[0]} weights and others do not; "
                          "fusing would untie them")
        shared_steps.append(distinct == 1 and len(chains) > 1)
    if any(shared_steps) and not all(shared_steps):
        raise Refused("rows share some layers but not others; fusing would untie them")
    shared = bool(shared_steps) and all(shared_steps)
    stats = next((op for op in chains[0].ops if op.row_kind.batch_statistics), None)
    if shared and stats is not None:
        raise Refused(f"rows share one {stats.row_kind.title}; folding rows into the batch "
                      "would change its statistics in train mode")
    return shared


def _check_untied(ctx: _Context, chains: list[RowChain], shared: bool,
                  twin_nodes: set[fx.Node]) -> None:
    """Moving the rows' weights must not untie them from a user outside the loop (the
    twin loop of a module applied twice shares the fused module). Rows folded into the
    batch keep calling the shared layers: nothing is untied."""
    if shared:
        return
    site_nodes = {op.node for c in chains for op in c.ops} | twin_nodes
    problem = ctx.uses.outside_problem(ctx.gm, _param_keys(chains), site_nodes)
    if problem:
        raise Refused(problem)


def _param_keys(chains: list[RowChain]) -> list[str]:
    return [key for c in chains for op in c.ops for _, key in op.params]


def _check_rows(chains: list[RowChain]) -> None:
    """Each step's own check of its rows (e.g. BatchNorm batch counters agree)."""
    root = chains[0].output.graph.owning_module
    for j, op in enumerate(chains[0].ops):
        problem = op.row_kind.rows_problem(root, [c.ops[j] for c in chains])
        if problem:
            raise Refused(problem)


# ---------------------------------------------------------------- layouts

def _walks(chains: list[RowChain]) -> list[list[fx.Node]]:
    """Per row, the index ops from its input back to where indexing stops (inclusive)."""
    walks = []
    for chain in chains:
        path, stop = walk_back(chain.input, set())
        walks.append(path + ([stop] if stop is not None else []))
    return walks


def _no_common_source(walks: list[list[fx.Node]]) -> Refused:
    ends = sorted({w[-1].name for w in walks if w})
    kinds = {getattr(w[-1].target, "__name__", str(w[-1].target)) for w in walks if w}
    hint = (f"each row starts at its own `{kinds.pop()}`, a per-row op fxfuse does not "
            "fuse, or rows depend on each other") if len(kinds) == 1 and len(ends) > 1 \
        else "rows may depend on each other"
    return Refused(f"rows read different tensors ({', '.join(ends[:3])}): not slices of "
                   f"one input; {hint}")


def _plan_input(cand: Candidate, chains: list[RowChain]
                ) -> tuple[fx.Node, list[fx.Node], InputPlan]:
    """The one tensor every row slices, the index nodes between, and the slicing."""
    walks = _walks(chains)
    common = set(walks[0]).intersection(*map(set, walks[1:]))
    source = next((n for n in walks[0] if n in common and tensor_shape(n) is not None), None)
    if source is None:
        raise _no_common_source(walks)
    if source is cand.combine or source in cand.output_nodes:
        raise Refused("rows read the tensor the loop writes: rows depend on each other")
    order = cand.graph_order({n for w in walks for n in w[:w.index(source)]})
    try:
        env = evaluate(order, {source: index_tensor(tensor_shape(source))})
        solve = solve_feature_input if family(chains[0]) == "linear" else solve_input
        plan = solve(tensor_shape(source), [env[c.input] for c in chains])
    except LayoutError as exc:
        raise Refused(f"rows are not plain slices of `{source.name}`: {exc}") from exc
    return source, order, plan


def _check_outputs_alike(cand: Candidate, outs: list[fx.Node]) -> tuple[int, ...]:
    shape = tensor_shape(outs[0])
    if shape is None or any(tensor_shape(n) != shape for n in outs):
        raise Refused("the rows' outputs differ in shape")
    dtype, row_dtype = tensor_dtype(cand.combine), tensor_dtype(outs[0])
    if dtype is not None and dtype != row_dtype:
        raise Refused(f"the rows are {row_dtype} but are written into a {dtype} tensor")
    return shape


def _check_private(order: list[fx.Node], inside: set[fx.Node], combine: fx.Node) -> None:
    for node in order:
        user = next((u for u in node.users if u not in inside), None)
        if node is not combine and user is not None:
            raise Refused(f"per-row intermediate `{node.name}` is also used by `{user.name}`")


def _plan_output(cand: Candidate, chains: list[RowChain]) -> OutputPlan:
    """Where each row's output lands in the combined result."""
    outs = [c.output for c in chains]
    shape = _check_outputs_alike(cand, outs)
    _check_rows(chains)
    combine = cand.combine
    nodes = set(cand.output_nodes) - cand.prelude if cand.kind == "buffer" else \
        cand.output_nodes | {combine}
    order = cand.graph_order(nodes)
    _check_private(order, nodes | set(outs) | {combine}, combine)

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
        raise Refused(f"rows are not combined as whole rows: {exc}") from exc
    if shape[0] == 1 and cand.kind != "buffer":
        # With one sample, where the batch dim goes (cat on dim 0, say) is ambiguous:
        # solve again with two; keep the first answer when the region fixes the batch.
        try:
            plan = solve(2)
        except LayoutError:
            pass
    return plan


def _plan_reduction(cand: Candidate, chains: list[RowChain], shared: bool,
                    groups: tuple) -> Reduction | None:
    """Rows summed over (``sum(outs)``, ``stack(outs, d).sum(d)``): one dense op."""
    ok = len(groups) == 1 and can_reduce(chains, shared)
    if cand.kind == "sum":
        shape = tensor_shape(chains[0].output)
        if not ok or shape is None or any(tensor_shape(c.output) != shape for c in chains):
            raise Refused("rows are summed, which fuses only for one Conv1d (groups=1) or one "
                          "Linear per row, each with its own weights and equal output shapes")
        return Reduction(cand.combine, identity_plan(len(shape)), "sum")
    users = list(cand.combine.users)
    found = reduce_kind(users[0]) if ok and len(users) == 1 and cand.kind != "buffer" else None
    if found is None:
        return None
    result = tensor_shape(cand.combine)
    plan = reduced_plan(_plan_output(cand, chains), len(result), found[1]) if result else None
    return Reduction(users[0], plan, found[0]) if plan else None
