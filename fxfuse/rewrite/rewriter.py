"""Rewrite one loop site into one convolution, in place on the GraphModule.

Before (the seed spelling, as traced)::

    getitem = x[(slice(None), slice(None), 0, slice(None))]
    layers_0 = self.layers[0](getitem);  unsqueeze = layers_0.unsqueeze(2)
    ...                                   # H times
    cat = torch.cat([unsqueeze, ..., unsqueeze_9], dim = 2)

After (``lowering="grouped"``)::

    permute = x.permute(0, 2, 1, 3);   flatten = permute.flatten(1, 2)
    layers_fused = self.layers_fused(flatten)        # Conv1d(H*C, H*C', k, groups=H)
    unflatten = layers_fused.unflatten(1, (10, 15))
    permute_1 = unflatten.permute(0, 2, 1, 3);  contiguous = permute_1.contiguous()

Only stock torch modules and ops are inserted, so the result runs, saves and exports
with nothing but torch.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from ..errors import RewriteError
from .emit import batched_chain, dense_sum
from ..match.kinds import Lane, RowOp, row_op
from ..match.kernels import has_padded_kernels
from ..match.rowdag import row_leaves
from ..match.ops import SIZE_QUERY, is_index_op
from ..match.sites import RowSite
from ..weightmap import WeightMap

LOWERINGS = ("grouped", "grouped2d", "im2col")
REPLACES_KEY = "fxfuse_replaces"   # node.meta key: name of the site result this node replaced
INSERTED_KEY = "fxfuse_site"       # node.meta key: the site whose rewrite inserted this node


def rewrite_site(gm: fx.GraphModule, site: RowSite, lowering: str = "grouped", *,
                 finalize: bool = True) -> WeightMap:
    """Replace ``site``'s per-row convs by one convolution.

    Args:
        gm: the traced module; changed in place (``lint`` + ``recompile`` done).
        site: a fusable site found in ``gm`` by :func:`fxfuse.find_row_sites`.
        lowering: ``"grouped"`` (one grouped ``Conv1d``), ``"grouped2d"`` (a grouped
            ``Conv2d`` with a (1, k) kernel on a channels-last view) or ``"im2col"``
            (unfold + batched matmul; rows with one kernel size per step). Sites whose rows
            share one module are always folded into the batch instead.
        finalize: lint, recompile and drop unused submodules now; pass False when
            rewriting many sites and call :func:`finalize_graph` once at the end.

    Returns:
        The :class:`WeightMap` from the original weights to the new module's.

    Raises:
        RewriteError: the site is not fusable or does not belong to ``gm``.
    """
    nodes, chains = _resolve(gm, site, lowering)
    graph = gm.graph
    everything = [op.node for chain in chains for op in chain]
    before = set(graph.nodes)
    with graph.inserting_before(_first(everything)):
        rows = make_rows_input(graph, nodes[site.source], site, one_row=_one_input(site))
        stacked, wmap = _fused_rows(gm, rows, chains, site, lowering)
        result = make_output(graph, stacked, site)
    leaves = [leaf for chain in chains for leaf in row_leaves(chain)]
    _redirect(graph, site, nodes, [c[-1].node for c in chains], everything, stacked, result)
    _erase_unused_slices(graph, leaves)
    for node in graph.nodes:
        if node not in before:
            node.meta[INSERTED_KEY] = site.name
    if not site.shared_module:
        _drop_unused_attrs(gm, [k for c in chains for op in c for _, k in op.params])
    if finalize:
        finalize_graph(gm)
    return wmap


def lowerings_for(site: RowSite, candidates: tuple[str, ...] = LOWERINGS) -> tuple[str, ...]:
    """The lowerings worth trying for ``site`` among ``candidates`` (rows folded into the
    batch, summed rows and Linear heads have one rewrite each, whatever the lowering)."""
    single = site.shared_module or site.reduce or site.family == "linear"
    if single:
        return ("grouped",)
    if has_padded_kernels(site.notes):    # im2col needs one kernel size per step
        return tuple(c for c in candidates if c != "im2col")
    return candidates


def _resolve(gm: fx.GraphModule, site: RowSite, lowering: str
             ) -> tuple[dict[str, fx.Node], list[list[RowOp]]]:
    """The graph's nodes by name and the site's rows as row ops; RewriteError when the
    site cannot be applied to ``gm``."""
    if lowering not in LOWERINGS:
        raise RewriteError(f"unknown lowering {lowering!r}; use one of {', '.join(LOWERINGS)}")
    if not site.fusable:
        raise RewriteError(f"{site.name} cannot be rewritten: {site.reason}")
    nodes = node_index(gm.graph)
    missing = [n for n in (site.source, site.combine, *site.convs) if n not in nodes]
    if missing:
        raise RewriteError(f"{site.name} does not match this graph (no node `{missing[0]}`); "
                           "find sites again after changing the graph")
    chains = [[row_op(nodes[n], gm) for n in chain] for chain in site.chains]
    if any(op is None for chain in chains for op in chain):
        raise RewriteError(f"{site.name}: a per-row op changed since the site was found")
    return nodes, chains


def _fused_rows(gm: fx.GraphModule, rows: fx.Node, chains: list[list[RowOp]], site: RowSite,
                lowering: str) -> tuple[fx.Node, WeightMap]:
    """(N, H, C', L') from the (N, H, C, L) rows: batched, summed, or fused group by group."""
    if site.shared_module:
        return batched_chain(gm.graph, rows, tuple(chains[0]), site.rows), WeightMap()
    if site.reduce:
        out, entries = dense_sum(gm, rows, chains, _prefix(site.targets) + "_fused", site.reduce,
                                 row_ndim=site.input_plan.row_ndim, one_input=_one_input(site))
        return out, WeightMap(tuple(entries))
    return _make_groups(gm, rows, chains, site, lowering)


def _one_input(site: RowSite) -> bool:
    """Whether the site sums Linear rows that all read the very same tensor (``fc1(h) +
    fc2(h)``): one Linear with the rows' weights summed, not the input repeated per row."""
    return bool(site.reduce) and site.family == "linear" and len(set(site.input_plan.rows)) == 1


def finalize_graph(gm: fx.GraphModule) -> None:
    """Check the graph, regenerate ``forward`` and drop the submodules nothing calls."""
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()


def node_index(graph: fx.Graph) -> dict[str, fx.Node]:
    """Nodes by name; a node that replaced an earlier site's result also answers to
    that result's name, so sites found before a rewrite still resolve after it."""
    index = {n.name: n for n in graph.nodes}
    for node in graph.nodes:
        replaced = node.meta.get(REPLACES_KEY)
        if replaced:
            index.setdefault(replaced, node)
    return index


def _first(nodes: list[fx.Node]) -> fx.Node:
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    return min(nodes, key=order.__getitem__)


def make_rows_input(graph: fx.Graph, source: fx.Node, site: RowSite, *,
                    one_row: bool = False) -> fx.Node:
    """Emit (N, H, C, L) rows of ``source`` in the site's row order (views when possible);
    with ``one_row``, only the first row (N, 1, C, L)."""
    plan = site.input_plan
    if one_row:
        plan = dataclasses.replace(plan, rows=plan.rows[:1])
    node = source
    if tuple(plan.axes) != tuple(range(len(plan.axes))):
        node = graph.call_method("permute", (node, *plan.axes))
    if plan.kind == "block":
        if not plan.is_identity_order:
            index = [r + j for r in plan.rows for j in range(plan.width)]
            node = graph.call_function(operator.getitem, (node, (slice(None), index)))
        node = graph.call_method("unflatten", (node, 1, (len(plan.rows), plan.width)))
    elif not plan.is_identity_order:
        node = graph.call_function(operator.getitem, (node, (slice(None), list(plan.rows))))
    if plan.feature_last:           # (N, H, C, ...) -> (N, H, ..., C): a Linear reads C
        node = graph.call_method("movedim", (node, 2, -1))
    if plan.row_shape:           # rows reshaped (Flatten modules): once, on all rows
        node = graph.call_method("flatten", (node, 2))
        if len(plan.row_shape) > 1:
            node = graph.call_method("unflatten", (node, 2, plan.row_shape))
    return node


def _make_groups(gm: fx.GraphModule, rows: fx.Node, chains: list[list[RowOp]],
                 site: RowSite, lowering: str) -> tuple[fx.Node, WeightMap]:
    """Fuse each group of equal rows; put the rows back in the loop's order."""
    graph = gm.graph
    groups = site.groups or (tuple(range(site.rows)),)
    parts, wmap = [], WeightMap()
    prefix = _prefix(site.targets) + "_fused"
    for members in groups:
        sub = rows if len(groups) == 1 else \
            graph.call_function(operator.getitem, (rows, (slice(None), list(members))))
        part, entries = _make_chain(gm, sub, [chains[i] for i in members], prefix, lowering,
                                    site)
        parts.append(part)
        wmap = wmap + WeightMap(tuple(entries))
    if len(groups) == 1:
        return parts[0], wmap
    joined = graph.call_function(torch.cat, (parts, 1))
    order = [pos for members in groups for pos in members]
    inverse = [order.index(h) for h in range(site.rows)]
    return graph.call_function(operator.getitem, (joined, (slice(None), inverse))), wmap


def _make_chain(gm: fx.GraphModule, rows: fx.Node, chains: list[list[RowOp]], prefix: str,
                lowering: str, site: RowSite) -> tuple[fx.Node, list]:
    """The fused steps of one group: (N, G, C, L) in, (N, G, C', L') out. Each step is
    emitted by its row-op kind."""
    graph, count, plan = gm.graph, len(chains), site.input_plan
    if site.family == "linear":
        lane = Lane(gm, rows, "linear", count, prefix, lowering,
                    row_ndim=plan.row_ndim)
    else:
        two_d = lowering == "grouped2d"
        start = _channels_last_input(graph, rows) if two_d else \
            graph.call_method("flatten", (rows, 1, 2))
        lane = Lane(gm, start, "conv", count, prefix, lowering, channels=plan.width, two_d=two_d)
    emit_rows(lane, chains)
    return lane.per_row(), lane.entries


def emit_rows(lane: Lane, chains: list[list[RowOp]]) -> None:
    """Emit each step once for all rows, in the rows' order; a step reads the fused
    values of its operands (the previous step, or for a row that is a DAG, any earlier
    step or the rows' input)."""
    first = chains[0]
    lane.values = {leaf: (lane.node, lane.two_d) for leaf in row_leaves(first)}
    for ops in zip(*chains):
        op = ops[0]
        lane.node, lane.two_d = lane.values[op.input]
        op.row_kind.emit(lane, list(ops))
        lane.values[op.node] = (lane.node, lane.two_d)
    lane.node, lane.two_d = lane.values[first[-1].node]


def _channels_last_input(graph: fx.Graph, rows: fx.Node) -> fx.Node:
    """(N, G, C, L) → (N, G*C, 1, L) in channels-last memory, with a single copy."""
    nlgc = graph.call_method("contiguous", (graph.call_method("permute", (rows, 0, 3, 1, 2)),))
    flat = graph.call_method("unsqueeze", (graph.call_method("flatten", (nlgc, 2, 3)), 1))
    return graph.call_method("permute", (flat, 0, 3, 1, 2))


def make_output(graph: fx.Graph, stacked: fx.Node, site: RowSite) -> fx.Node:
    """Emit the combined result from (N, H, C', L') ``stacked``, laid out as the loop did."""
    plan = site.output_plan
    node = stacked
    identity = tuple(range(len(plan.perm)))
    if plan.perm != identity:
        node = graph.call_method("permute", (node, *plan.perm))
    for start, stop in reversed(plan.spans()):
        if stop - start > 1:
            node = graph.call_method("flatten", (node, start, stop - 1))
    if plan.perm != identity:
        node = graph.call_method("contiguous", (node,))
    return node


def _redirect(graph: fx.Graph, site: RowSite, nodes: dict[str, fx.Node],
              outs: list[fx.Node], everything: list[fx.Node], stacked: fx.Node,
              result: fx.Node) -> None:
    """Point every outside user at the new nodes, then erase the loop."""
    combine = nodes[site.combine]
    region = {nodes[n] for n in site.output_nodes} | {combine}
    for h, out in enumerate(outs):
        if out.name in site.row_exports:
            _export_row(graph, out, h, stacked, region)
    result.meta.update({k: v for k, v in combine.meta.items() if k != "fxfuse_value"})
    result.meta[REPLACES_KEY] = combine.meta.get(REPLACES_KEY, combine.name)
    for user in list(combine.users):
        if user not in region:
            user.replace_input_with(combine, result)
    order = {n: i for i, n in enumerate(graph.nodes)}
    doomed = sorted(region | set(everything), key=order.__getitem__, reverse=True)
    for node in doomed:
        graph.erase_node(node)
    _erase_dead(graph, [nodes[n] for n in reversed(site.input_nodes)])


def _export_row(graph: fx.Graph, out: fx.Node, h: int, stacked: fx.Node,
                region: set[fx.Node]) -> None:
    """Point the outside users of row ``h``'s result at its slice of the stacked result."""
    with graph.inserting_after(stacked):
        view = graph.call_method("select", (stacked, 1, h))
    row = view
    row.meta.update({k: v for k, v in out.meta.items() if k != "fxfuse_value"})
    if _escapes(out, region):
        # The row is returned or changed in place: a copy, so that it does not
        # alias the fused result (the original row was its own tensor).
        with graph.inserting_after(row):
            row = graph.call_method("clone", (row,))
        row.meta.update({k: v for k, v in out.meta.items() if k != "fxfuse_value"})
    row.meta[REPLACES_KEY] = out.meta.get(REPLACES_KEY, out.name)
    out.replace_all_uses_with(row, delete_user_cb=lambda u: u not in region)


def _escapes(out: fx.Node, region: set[fx.Node]) -> bool:
    """A per-row result returned by the model or changed in place: a view of the fused
    result would alias the other outputs (or be changed through them)."""
    def in_place(node: fx.Node) -> bool:
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        return name.endswith("_") and not name.startswith("_")
    return any(u.op == "output" or in_place(u) for u in out.users if u not in region)


def _erase_dead(graph: fx.Graph, candidates: list[fx.Node]) -> None:
    """Erase indexing nodes (and unused ``get_attr``) nothing reads any more."""
    for node in candidates:
        if not node.users:
            graph.erase_node(node)
    for node in reversed(list(graph.nodes)):
        if not node.users and (node.op == "get_attr" or _is_size_query(node)
                               or _is_attr_row(node)):
            graph.erase_node(node)


def _is_attr_row(node: fx.Node) -> bool:
    """``W[i]`` of an attribute (a per-row raw weight)."""
    from ..match.kinds.rawparam import attr_row
    return attr_row(node) is not None


def _erase_unused_slices(graph: fx.Graph, leaves: list[fx.Node]) -> None:
    """Erase row slices nothing reads any more (a row that slices its input twice,
    ``x[:, h] + f(x[:, h])``), with the index ops above them."""
    pending, alive = list(leaves), set(graph.nodes)
    while pending:
        node = pending.pop()
        if node in alive and not node.users and is_index_op(node):
            above = node.all_input_nodes
            graph.erase_node(node)
            alive.discard(node)
            pending.extend(above)


def _is_size_query(node: fx.Node) -> bool:
    """``aten.sym_size``, ``x.shape``, ``x.size(...)``, or an item of one (``x.shape[0]``,
    left unused when a per-row ``reshape(B, -1)`` goes)."""
    if SIZE_QUERY.calls_function(node) or node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return True
    return node.op == "call_function" and node.target is operator.getitem and \
        isinstance(node.args[0], fx.Node) and _is_size_query(node.args[0])


def _drop_unused_attrs(gm: fx.GraphModule, keys: list[str]) -> None:
    """Remove the erased functional convs' weights that no node reads any more
    (module weights go with their modules in ``delete_all_unused_submodules``)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for key in keys:
        owner, _, attr = key.rpartition(".")
        if key in used or owner in modules:
            continue
        mod = gm.get_submodule(owner) if owner else gm
        if isinstance(mod, torch.nn.Conv1d):
            continue
        if hasattr(mod, attr):
            delattr(mod, attr)


def _prefix(targets: tuple[str, ...]) -> str:
    parts = [t.split(".") for t in targets]
    common: list[str] = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        common.append(group[0])
    return "_".join(common) or "rows"
