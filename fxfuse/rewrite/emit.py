"""Build the fused ops of one group of rows: stock modules, stock ops, nothing else.

Conv towers run on (N, G*C, L): a grouped ``Conv1d`` (or ``Conv2d`` (1, k) on a
channels-last view) per conv step, one ``BatchNorm1d(G*C)`` per batch-norm step,
pointwise ops once. Linear heads run on (N, G, ..., L): one batched matmul per Linear.
Each builder returns the new node and the weight-map entries of what it created.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..match.convspec import get_tensor
from ..match.rowops import RowOp
from .weights import WeightEntry


def _free_name(gm: fx.GraphModule, name: str) -> str:
    candidate, i = name, 1
    while hasattr(gm, candidate):
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _joined(gm: fx.GraphModule, ops: list[RowOp], role: str, how: str) -> torch.Tensor:
    tensors = [get_tensor(gm, op.param(role)).detach() for op in ops]
    return torch.stack(tensors) if how == "stack" else torch.cat(tensors)


def _load(module: nn.Module, gm: fx.GraphModule, ops: list[RowOp], name: str, how: str = "cat",
          unsqueeze: int | None = None) -> list[WeightEntry]:
    """Copy the rows' tensors into ``module``'s and describe the mapping."""
    entries = []
    with torch.no_grad():
        for role, _ in ops[0].params:
            target = getattr(module, role)
            parts = tuple(op.param(role) for op in ops)
            if role == "num_batches_tracked":
                target.copy_(get_tensor(gm, parts[0]))
                entries.append(WeightEntry(f"{name}.{role}", parts, 0, None, "same"))
                continue
            value = _joined(gm, ops, role, how)
            target.copy_(value if unsqueeze is None or role != "weight" else value.unsqueeze(unsqueeze))
            if isinstance(target, nn.Parameter):
                target.requires_grad_(get_tensor(gm, parts[0]).requires_grad)
            entries.append(WeightEntry(f"{name}.{role}", parts, 0,
                                       unsqueeze if role == "weight" else None, how))
    return entries


REGISTRY_KEY = "fxfuse_fused_modules"   # gm.meta: (variant, rows' params) -> module name


def _fused(gm: fx.GraphModule, ops: list[RowOp], variant: str, prefix: str, build,
           **load: object) -> tuple[str, list[WeightEntry]]:
    """The fused module for these rows' weights: made once, and reused when another site
    runs the very same layers (a loop module applied twice), so weights stay tied."""
    registry = gm.meta.setdefault(REGISTRY_KEY, {})
    key = (variant, tuple(op.params for op in ops))
    if key in registry and hasattr(gm, registry[key]):
        return registry[key], []
    module = build()
    name = _free_name(gm, prefix)
    entries = _load(module, gm, ops, name, **load)
    gm.add_submodule(name, module)
    registry[key] = name
    return name, entries


def conv_step(gm: fx.GraphModule, cur: fx.Node, ops: list[RowOp], prefix: str,
              lowering: str, first: bool) -> tuple[fx.Node, list[WeightEntry], int]:
    """One grouped conv for the rows' convs; returns (node, entries, out channels)."""
    spec, g = ops[0].key, len(ops)
    kw = dict(groups=g * spec.groups, bias=spec.bias, padding_mode=spec.padding_mode,
              dtype=spec.dtype, device=spec.device)
    pad = spec.padding
    graph = gm.graph
    if lowering == "grouped2d":
        name, entries = _fused(gm, ops, "conv2d", prefix, lambda: nn.Conv2d(
            g * spec.in_channels, g * spec.out_channels, (1, spec.kernel_size),
            stride=(1, spec.stride), padding=pad if isinstance(pad, str) else (0, pad),
            dilation=(1, spec.dilation), **kw).train(gm.training), unsqueeze=2)
        x = cur if first else graph.call_method("unsqueeze", (cur, 2))
        out = graph.call_method("squeeze", (graph.call_module(name, (x,)), 2))
    else:
        name, entries = _fused(gm, ops, "conv1d", prefix, lambda: nn.Conv1d(
            g * spec.in_channels, g * spec.out_channels, spec.kernel_size, stride=spec.stride,
            padding=pad, dilation=spec.dilation, **kw).train(gm.training))
        out = graph.call_module(name, (cur,))
    return out, entries, g * spec.out_channels


def batchnorm_step(gm: fx.GraphModule, cur: fx.Node, ops: list[RowOp],
                   prefix: str) -> tuple[fx.Node, list[WeightEntry]]:
    """One ``BatchNorm1d(G*C)``: per-channel statistics are the rows' own, train mode too."""
    _, features, eps, momentum, affine, track, training, dtype = ops[0].key
    device = get_tensor(gm, ops[0].params[0][1]).device
    name, entries = _fused(gm, ops, "batchnorm", prefix, lambda: nn.BatchNorm1d(
        features * len(ops), eps=eps, momentum=momentum, affine=affine,
        track_running_stats=track, device=device, dtype=dtype).train(training))
    return gm.graph.call_module(name, (cur,)), entries


def linear_step(gm: fx.GraphModule, cur: fx.Node, ops: list[RowOp], prefix: str,
                row_ndim: int) -> tuple[fx.Node, list[WeightEntry]]:
    """(N, G, ..., L) → (N, G, ..., P) with the G weights stacked: one batched matmul."""
    weight = get_tensor(gm, ops[0].param("weight"))
    has_bias = ops[0].param("bias") is not None

    def build() -> nn.Module:
        holder = nn.Module()
        holder.weight = nn.Parameter(torch.empty(len(ops), *weight.shape, dtype=weight.dtype,
                                                 device=weight.device))
        if has_bias:
            holder.bias = nn.Parameter(torch.empty(len(ops), weight.shape[0],
                                                   dtype=weight.dtype, device=weight.device))
        return holder

    name, entries = _fused(gm, ops, "linear", prefix, build, how="stack")
    graph = gm.graph
    w = graph.get_attr(f"{name}.weight")
    b = graph.get_attr(f"{name}.bias") if has_bias else None
    if row_ndim == 2 and weight.shape[1] == 1:   # Linear(1, P) per row: a broadcast multiply-add
        w0 = graph.call_function(operator.getitem, (w, (Ellipsis, 0)))
        if b is None:
            return graph.call_function(torch.mul, (cur, w0)), entries
        return graph.call_function(torch.addcmul, (b, cur, w0)), entries
    if row_ndim == 2:           # (N, G, L): G matmuls (N, L) @ (L, P) in one baddbmm
        xt = graph.call_method("transpose", (cur, 0, 1))
        wt = graph.call_method("transpose", (w, 1, 2))
        if b is not None:
            out = graph.call_function(torch.baddbmm, (graph.call_method("unsqueeze", (b, 1)), xt, wt))
        else:
            out = graph.call_function(torch.bmm, (xt, wt))
        return graph.call_method("transpose", (out, 0, 1)), entries
    out = graph.call_function(torch.einsum, ("ng...l,gpl->ng...p", cur, w))
    if b is not None:
        shape = (len(ops),) + (1,) * (row_ndim - 2) + (weight.shape[0],)
        out = graph.call_function(torch.add, (out, graph.call_method("view", (b, *shape))))
    return out, entries


def pointwise_step(graph: fx.Graph, cur: fx.Node, op: RowOp) -> fx.Node:
    """The row-0 pointwise op, applied once to every row."""
    node = op.node
    return graph.create_node(node.op, node.target, (cur, *node.args[1:]), dict(node.kwargs))


def batched_chain(graph: fx.Graph, rows: fx.Node, ops: tuple[RowOp, ...], count: int) -> fx.Node:
    """All rows run the very same layers: fold rows into the batch, run them once."""
    cur = graph.call_method("flatten", (rows, 0, 1))
    for op in ops:
        node = op.node
        args = tuple(cur if a is op.input else a for a in node.args)
        kwargs = {k: (cur if v is op.input else v) for k, v in node.kwargs.items()}
        cur = graph.create_node(node.op, node.target, args, kwargs)
    return graph.call_method("unflatten", (cur, 0, (-1, count)))


def dense_sum(gm: fx.GraphModule, rows: fx.Node, chains: list[list[RowOp]], prefix: str,
              reduce: str) -> tuple[fx.Node, list[WeightEntry]]:
    """Σ_h op_h(x_h) as one dense op over (N, H*C, L) (conv) or (N, H*L) (linear), with
    weights concatenated on the input dim and the stacked biases summed."""
    graph = gm.graph
    cur = rows
    for step in list(zip(*chains))[:-1]:
        cur = pointwise_step(graph, cur, step[0])
    cur = graph.call_method("flatten", (cur, 1, 2))
    ops = [c[-1] for c in chains]
    weight = get_tensor(gm, ops[0].param("weight"))
    name = _free_name(gm, prefix)
    if ops[0].kind == "conv":
        spec = ops[0].key
        module: nn.Module = nn.Conv1d(len(ops) * spec.in_channels, spec.out_channels,
                                      spec.kernel_size, stride=spec.stride, padding=spec.padding,
                                      dilation=spec.dilation, bias=False,
                                      padding_mode=spec.padding_mode, dtype=weight.dtype,
                                      device=weight.device)
    else:
        module = nn.Linear(len(ops) * weight.shape[1], weight.shape[0], bias=False,
                           dtype=weight.dtype, device=weight.device)
    parts = tuple(op.param("weight") for op in ops)
    with torch.no_grad():
        module.weight.copy_(torch.cat([get_tensor(gm, k).detach() for k in parts], dim=1))
    module.weight.requires_grad_(weight.requires_grad)
    gm.add_submodule(name, module)
    entries = [WeightEntry(f"{name}.weight", parts, 1, None, "cat")]
    out = graph.call_module(name, (cur,))
    if ops[0].param("bias") is not None:
        holder = nn.Module()
        holder.bias = nn.Parameter(torch.stack([get_tensor(gm, op.param("bias")).detach()
                                                for op in ops]))
        holder.bias.requires_grad_(get_tensor(gm, ops[0].param("bias")).requires_grad)
        bias_name = _free_name(gm, f"{name}_bias")
        gm.add_submodule(bias_name, holder)
        entries.append(WeightEntry(f"{bias_name}.bias", tuple(op.param("bias") for op in ops),
                                   0, None, "stack"))
        total = graph.call_method("sum", (graph.get_attr(f"{bias_name}.bias"), 0))
        if ops[0].kind == "conv":
            total = graph.call_method("unsqueeze", (total, -1))
        out = graph.call_function(torch.add, (out, total))
    if reduce == "mean":
        out = graph.call_function(torch.div, (out, len(ops)))
    return out, entries
