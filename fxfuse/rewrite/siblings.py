"""Rewrite a sibling-Linear site (:mod:`fxfuse.match.siblings`): one stock ``nn.Linear``
whose output features are the siblings' concatenated in order; each former output is
the slice ``y[..., a:b]`` of the fused one. Exact: every output feature is the same dot
product as before. The weight map records ``cat`` on dim 0 of weight and bias."""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..match.siblings import _linear_of
from ..match.sites import RowSite
from ..graphs.build import free_name
from .rewriter import INSERTED_KEY, REPLACES_KEY, _drop_unused_attrs, node_index
from ..weightmap import WeightEntry, WeightMap


def rewrite_siblings(gm: fx.GraphModule, site: RowSite, *, finalize: bool = True) -> WeightMap:
    """Replace the site's Linear calls by one fused ``nn.Linear`` and slices (in place)."""
    nodes = node_index(gm.graph)
    x = nodes[site.source]
    calls = [nodes[n] for n in site.convs]
    infos = [_linear_of(gm, n, x) for n in calls]
    if any(i is None for i in infos):
        raise ValueError(f"{site.name}: the sibling Linears are no longer plain Linears of "
                         f"`{site.source}`")
    weights = [i[2] for i in infos]
    biases = [i[3] for i in infos]
    has_bias = biases[0] is not None
    fused = _fused_linear(weights, biases, has_bias)
    name = free_name(gm, f"{site.name}_siblings")
    fused.train(gm.training)
    gm.add_submodule(name, fused)
    attrs = _weight_reads(calls)
    first = min(calls, key=lambda n: list(gm.graph.nodes).index(n))
    with gm.graph.inserting_before(first):
        y = gm.graph.call_module(name, (x,))
    y.meta[INSERTED_KEY] = site.name
    _slice_outputs(gm, site, y, calls, weights)
    for node in attrs:                    # F.linear's weight reads, now unused
        if not node.users:
            gm.graph.erase_node(node)
    _drop_unused_attrs(gm, [str(n.target) for n in attrs])
    entries = _weight_entries(name, infos, has_bias)
    if finalize:
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
    return WeightMap(tuple(entries))


def _fused_linear(weights: list, biases: list, has_bias: bool) -> nn.Linear:
    """One ``nn.Linear`` holding the siblings' weights (and biases) concatenated on dim 0."""
    w0 = weights[0]
    fused = nn.Linear(w0.shape[1], sum(w.shape[0] for w in weights), bias=has_bias,
                      device=w0.device, dtype=w0.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([w.detach() for w in weights], 0))
        if has_bias:
            fused.bias.copy_(torch.cat([b.detach() for b in biases], 0))
    for p in fused.parameters():
        p.requires_grad_(w0.requires_grad)
    return fused


def _slice_outputs(gm: fx.GraphModule, site: RowSite, y: fx.Node, calls: list,
                   weights: list) -> None:
    """Replace each sibling call by its slice ``y[..., a:b]`` of the fused output."""
    start, last = 0, y
    for node, w in zip(calls, weights):
        stop = start + w.shape[0]
        with gm.graph.inserting_after(last):
            piece = gm.graph.call_function(operator.getitem, (y, (Ellipsis, slice(start, stop))))
        piece.meta[INSERTED_KEY] = site.name
        last = piece
        piece.meta[REPLACES_KEY] = node.name
        if "tensor_meta" in node.meta:
            piece.meta["tensor_meta"] = node.meta["tensor_meta"]
        node.replace_all_uses_with(piece)
        gm.graph.erase_node(node)
        start = stop


def _weight_reads(calls: list) -> list:
    """The ``get_attr`` nodes that functional sibling calls (``F.linear``) read."""
    return [a for n in calls if n.op == "call_function" for a in n.all_input_nodes
            if a.op == "get_attr"]


def _weight_entries(name: str, infos: list, has_bias: bool) -> list:
    """Weight-map entries: the fused weight (and bias) is ``cat`` on dim 0 of the siblings'."""
    entries = [WeightEntry(f"{name}.weight", tuple(i[0] for i in infos), dim=0, op="cat")]
    if has_bias:
        entries.append(WeightEntry(f"{name}.bias", tuple(i[1] for i in infos), dim=0, op="cat"))
    return entries
