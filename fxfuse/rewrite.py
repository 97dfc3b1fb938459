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

import operator
import torch
from torch import fx

from .convspec import get_tensor
from .errors import RewriteError
from .ops import conv_call
from .sites import RowSite
from .weights import WeightEntry, WeightMap

LOWERINGS = ("grouped", "grouped2d")
REPLACES_KEY = "fxfuse_replaces"   # node.meta key: name of the site result this node replaced


def rewrite_site(gm: fx.GraphModule, site: RowSite, lowering: str = "grouped") -> WeightMap:
    """Replace ``site``'s per-row convs by one convolution.

    Args:
        gm: the traced module; changed in place (``lint`` + ``recompile`` done).
        site: a fusable site found in ``gm`` by :func:`fxfuse.find_row_sites`.
        lowering: ``"grouped"`` (one grouped ``Conv1d``) or ``"grouped2d"`` (a grouped
            ``Conv2d`` with a (1, k) kernel on a channels-last view). Sites whose rows
            share one module are always folded into the batch instead.

    Returns:
        The :class:`WeightMap` from the original weights to the new module's.

    Raises:
        RewriteError: the site is not fusable or does not belong to ``gm``.
    """
    if lowering not in LOWERINGS:
        raise RewriteError(f"unknown lowering {lowering!r}; use one of {', '.join(LOWERINGS)}")
    if not site.fusable:
        raise RewriteError(f"{site.name} cannot be rewritten: {site.reason}")
    nodes = node_index(gm.graph)
    missing = [n for n in (site.source, site.combine, *site.convs) if n not in nodes]
    if missing:
        raise RewriteError(f"{site.name} does not match this graph (no node `{missing[0]}`); "
                           "find sites again after changing the graph")
    graph = gm.graph
    convs = [nodes[c] for c in site.convs]
    calls = [conv_call(n, gm) for n in convs]
    with graph.inserting_before(_first(convs)):
        rows = make_rows_input(graph, nodes[site.source], site)
        if site.shared_module:
            stacked, wmap = _make_batched(graph, rows, convs[0], site), WeightMap()
        else:
            stacked, wmap = _make_fused(gm, rows, calls, site, lowering)
        result = make_output(graph, stacked, site)
    _redirect(graph, site, nodes, convs, stacked, result)
    graph.lint()
    if not site.shared_module:
        _drop_unused_attrs(gm, [k for c in calls for k in (c.weight_key, c.bias_key) if k])
    gm.recompile()
    gm.delete_all_unused_submodules()
    return wmap


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


def make_rows_input(graph: fx.Graph, source: fx.Node, site: RowSite) -> fx.Node:
    """Emit (N, H, C, L) rows of ``source`` in the site's row order (views when possible)."""
    plan = site.input_plan
    node = source
    if tuple(plan.axes) != tuple(range(len(plan.axes))):
        node = graph.call_method("permute", (node, *plan.axes))
    if plan.kind == "block":
        if not plan.is_identity_order:
            index = [r + j for r in plan.rows for j in range(plan.width)]
            node = graph.call_function(operator.getitem, (node, (slice(None), index)))
        return graph.call_method("unflatten", (node, 1, (len(plan.rows), plan.width)))
    if not plan.is_identity_order:
        node = graph.call_function(operator.getitem, (node, (slice(None), list(plan.rows))))
    return node


def _make_batched(graph: fx.Graph, rows: fx.Node, conv: fx.Node, site: RowSite) -> fx.Node:
    """All rows share one conv: fold rows into the batch and call it once."""
    folded = graph.call_method("flatten", (rows, 0, 1))
    call = conv_call(conv, graph.owning_module)
    args = tuple(folded if a is call.input else a for a in conv.args)
    kwargs = {k: (folded if v is call.input else v) for k, v in conv.kwargs.items()}
    out = graph.create_node(conv.op, conv.target, args, kwargs)
    return graph.call_method("unflatten", (out, 0, (-1, site.rows)))


def _make_fused(gm: fx.GraphModule, rows: fx.Node, calls: list, site: RowSite,
                lowering: str) -> tuple[fx.Node, WeightMap]:
    graph = gm.graph
    module = _fused_module(gm, calls, site, lowering)
    name = _free_name(gm, _prefix(site.targets) + "_fused")
    gm.add_submodule(name, module)
    if lowering == "grouped2d":
        # One copy straight into channels-last order (N, L, H, C), viewed as (N, H*C, 1, L).
        nlhc = graph.call_method("contiguous", (graph.call_method("permute", (rows, 0, 3, 1, 2)),))
        flat = graph.call_method("unsqueeze", (graph.call_method("flatten", (nlhc, 2, 3)), 1))
        out = graph.call_module(name, (graph.call_method("permute", (flat, 0, 3, 1, 2)),))
        out = graph.call_method("squeeze", (out, 2))
    else:
        out = graph.call_module(name, (graph.call_method("flatten", (rows, 1, 2)),))
    stacked = graph.call_method("unflatten", (out, 1, (site.rows, site.spec.out_channels)))
    unsq = 2 if lowering == "grouped2d" else None
    entries = [WeightEntry(f"{name}.weight", tuple(c.weight_key for c in calls), 0, unsq)]
    if site.spec.bias:
        entries.append(WeightEntry(f"{name}.bias", tuple(c.bias_key for c in calls), 0))
    return stacked, WeightMap(tuple(entries))


def _fused_module(gm: fx.GraphModule, calls, site: RowSite, lowering: str) -> torch.nn.Module:
    spec, h = site.spec, site.rows
    kw = dict(groups=h * spec.groups, bias=spec.bias, padding_mode=spec.padding_mode,
              dtype=spec.dtype, device=spec.device)
    weights = [get_tensor(gm, c.weight_key) for c in calls]
    weight = torch.cat([w.detach() for w in weights], 0)
    pad = spec.padding
    if lowering == "grouped2d":
        module: torch.nn.Module = torch.nn.Conv2d(
            h * spec.in_channels, h * spec.out_channels, (1, spec.kernel_size),
            stride=(1, spec.stride), padding=pad if isinstance(pad, str) else (0, pad),
            dilation=(1, spec.dilation), **kw)
        weight = weight.unsqueeze(2)
    else:
        module = torch.nn.Conv1d(h * spec.in_channels, h * spec.out_channels, spec.kernel_size,
                                 stride=spec.stride, padding=pad, dilation=spec.dilation, **kw)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.weight.requires_grad_(weights[0].requires_grad)
        if spec.bias:
            biases = [get_tensor(gm, c.bias_key) for c in calls]
            module.bias.copy_(torch.cat([b.detach() for b in biases], 0))
            module.bias.requires_grad_(biases[0].requires_grad)
    module.train(gm.training)
    return module


def make_output(graph: fx.Graph, stacked: fx.Node, site: RowSite) -> fx.Node:
    """Emit the combined result from (N, H, C', L') ``stacked``, laid out as the loop did."""
    plan = site.output_plan
    node = stacked
    if plan.perm != (0, 1, 2, 3):
        node = graph.call_method("permute", (node, *plan.perm))
    start = 0
    runs = []
    for count in plan.merge:
        runs.append((start, start + count - 1))
        start += count
    for first, last in reversed(runs):
        if last > first:
            node = graph.call_method("flatten", (node, first, last))
    if plan.perm != (0, 1, 2, 3):
        node = graph.call_method("contiguous", (node,))
    return node


def _redirect(graph: fx.Graph, site: RowSite, nodes: dict[str, fx.Node],
              convs: list[fx.Node], stacked: fx.Node, result: fx.Node) -> None:
    """Point every outside user at the new nodes, then erase the loop."""
    combine = nodes[site.combine]
    region = {nodes[n] for n in site.output_nodes} | {combine}
    for h, conv in enumerate(convs):
        if conv.name in site.row_exports:
            with graph.inserting_after(stacked):
                row = graph.call_method("select", (stacked, 1, h))
            conv.replace_all_uses_with(row, delete_user_cb=lambda u: u not in region)
    result.meta.update({k: v for k, v in combine.meta.items() if k != "fxfuse_value"})
    result.meta[REPLACES_KEY] = combine.meta.get(REPLACES_KEY, combine.name)
    for user in list(combine.users):
        if user not in region:
            user.replace_input_with(combine, result)
    order = {n: i for i, n in enumerate(graph.nodes)}
    doomed = sorted(region | set(convs), key=order.__getitem__, reverse=True)
    for node in doomed:
        graph.erase_node(node)
    _erase_dead(graph, [nodes[n] for n in reversed(site.input_nodes)])


def _erase_dead(graph: fx.Graph, candidates: list[fx.Node]) -> None:
    """Erase indexing nodes (and unused ``get_attr``) nothing reads any more."""
    for node in candidates:
        if not node.users:
            graph.erase_node(node)
    for node in reversed(list(graph.nodes)):
        if not node.users and (node.op == "get_attr" or _is_size_query(node)):
            graph.erase_node(node)


def _is_size_query(node: fx.Node) -> bool:
    packet = getattr(node.target, "overloadpacket", None)
    return node.op == "call_function" and packet in (torch.ops.aten.sym_size,)


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


def _free_name(gm: fx.GraphModule, name: str) -> str:
    candidate, i = name, 1
    while hasattr(gm, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate

